"""The one stage contract: every stage of a build (curate, crawl, images, decontaminate, balance, shard) and the
audit is a :class:`Stage` with a typed config, named input URIs, one output URI, and a :class:`StageResult`.

    result = ImagesStage(cfg.images, {"crawl": crawl_dir}, pool_dir, rejected=rejected_uri).run()

``run()`` computes the stage's fingerprint (inputs' content hashes + config + code version), returns the recorded
result when the stage's marker says it is done with that fingerprint and its files exist, else computes it,
writes every output atomically through :mod:`pipelines.core.storage`, and writes the marker last. The build's
manifest assembles its funnel from the results (see :func:`funnel`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from pipelines.core import markers, storage

MARKER = "_STAGE.json"


class StageAccountingError(AssertionError):
    """A stage's rows do not add up (input != kept + rejected): a bug, never a user error."""


@dataclass
class StageResult:
    """What a stage did: rows in, rows kept, rows rejected per reason, where its outputs are, how it was run."""

    stage: str
    input_rows: int
    kept: int
    rejected: dict[str, int]  # reason -> rows (the stage column of those rows is ``stage`` or a sub-stage)
    outputs: dict[str, Any]  # name -> URI or list of URIs
    params: dict
    fingerprint: str
    details: dict = field(default_factory=dict)  # stage-specific figures for the manifest (t, entry counts, ...)
    reused: bool = False

    def __post_init__(self):
        self.rejected = {k: int(v) for k, v in sorted(self.rejected.items()) if v}
        if self.input_rows != self.kept + sum(self.rejected.values()):
            raise StageAccountingError(f"stage {self.stage}: {self.input_rows} rows in != {self.kept} kept + "
                                       f"{sum(self.rejected.values())} rejected {self.rejected}")

    def files(self) -> list[str]:
        out: list[str] = []
        for v in self.outputs.values():
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                out.extend(x for x in v if isinstance(x, str))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("reused")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, reused: bool = False) -> "StageResult":
        return cls(**{k: v for k, v in d.items() if k != "reused"}, reused=reused)


class Stage(ABC):
    """Base of every stage. Subclasses set ``name`` and implement :meth:`input_files` and :meth:`compute`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the stage's outputs change for the same inputs and config

    def __init__(self, config: Any, inputs: Mapping[str, Any], output: str, *, rejected: str | None = None,
                 beam_args: Sequence[str] = ()):
        self.config = config
        self.inputs = dict(inputs)
        self.output = output
        self.rejected = rejected
        self.beam_args = list(beam_args)

    # -- what decides the output
    @abstractmethod
    def input_files(self) -> list[str]:
        """The files whose content decides this stage's output (hashed into the fingerprint)."""

    def params(self) -> dict:
        cfg = self.config
        return cfg.to_dict() if hasattr(cfg, "to_dict") else (asdict(cfg) if cfg is not None else {})

    def extra_fingerprint(self) -> Any:
        """Anything else that decides the output (e.g. evaluation-set fingerprints)."""
        return None

    def fingerprint(self) -> str:
        return markers.fingerprint(self.name, self.version, markers.CODE_VERSION,
                                   markers.content_hashes(self.input_files()), self.params(), self.rejected,
                                   self.extra_fingerprint())

    @property
    def marker_uri(self) -> str:
        return storage.join(self.output, MARKER)

    # -- running
    @abstractmethod
    def compute(self, fingerprint: str) -> StageResult:
        """Do the work, writing every output atomically; return the result (the marker is written by run)."""

    def verify(self, recorded: StageResult) -> bool:
        """Extra check of a recorded result before it is reused (default: none; e.g. shard sizes)."""
        return True

    def run(self, *, force: bool = False) -> StageResult:
        fp = self.fingerprint()
        if not force:
            recorded = markers.done(self.marker_uri, fp)
            if recorded is not None:
                result = StageResult.from_dict(recorded, reused=True)
                if self.verify(result):
                    return result
        else:
            markers.clear(self.marker_uri)
        result = self.compute(fp)
        markers.write(self.marker_uri, fp, result.files(), result.to_dict())
        return result


def funnel(results: Iterable[StageResult]) -> dict:
    """The manifest's funnel from stage results in order: rows in/out/rejected per stage, and every reason.

    Stage i's kept rows are stage i+1's input rows; the first stage's input is the build's input and the last
    stage's kept rows are the published samples, so ``input_rows == kept + sum(rejected)`` over the whole build.
    """
    results = list(results)
    stages = {r.stage: {"in": r.input_rows, "out": r.kept, "rejected": dict(r.rejected)} for r in results}
    for a, b in zip(results, results[1:]):
        if a.kept != b.input_rows:
            raise StageAccountingError(f"stage {a.stage} kept {a.kept} rows but stage {b.stage} read {b.input_rows}")
    flat: dict[str, int] = {}
    for r in results:
        for reason, n in r.rejected.items():
            key = reason if ":" in reason and reason.split(":", 1)[0] in _STAGE_PREFIXES else f"{r.stage}:{reason}"
            flat[key] = flat.get(key, 0) + n
    return {"input_rows": results[0].input_rows if results else 0, "kept": results[-1].kept if results else 0,
            "stages": stages, "order": [r.stage for r in results], "rejected": dict(sorted(flat.items()))}


_STAGE_PREFIXES = {"curate", "crawl", "images", "dedup", "decontam", "balance", "shard", "filter"}
