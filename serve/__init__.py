"""The Ray Serve application of a distilled student (``serve.app``); see serve/README.md."""
