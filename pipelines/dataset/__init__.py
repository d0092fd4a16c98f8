"""Dataset roots: numbered versions built incrementally, a crawl store shared by every version, takedowns, diffs
between versions and a data card per version.

- :mod:`pipelines.dataset.versions`: the ROOT layout, version numbers, the atomic LATEST pointer, publishing,
  listing with sizes, the state key of a build and the manifest comparison used for byte-identity checks;
- :mod:`pipelines.dataset.crawl_store`: every URL's download (bytes, hashes or failure reason), back-off by reason
  on the build's ``as_of`` clock;
- :mod:`pipelines.dataset.store_crawl`: the crawl stage of a version build, through the store;
- :mod:`pipelines.dataset.hooks`: how a version build's stage plan differs from a plain build's;
- :mod:`pipelines.dataset.takedown`: removal requests by URL, uid or domain;
- :mod:`pipelines.dataset.diff`: samples added/removed between two versions, with reasons, and entry movers;
- :mod:`pipelines.dataset.card`: the Hugging Face dataset card (README.md) and card.html of a version.

The flow is :func:`flows.versions.build_version`; the commands are in :mod:`flows.cli_versions`.
"""
