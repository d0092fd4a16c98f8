"""CLIP-score filtering of a build's pool (DataComp's baseline): :class:`ClipScoreStage`."""
