"""Phase runners: everything that runs a model behind the ``PhaseRunner`` protocol of runtime/step.py.

``eager`` (dlc.models modules, the reference), ``graph`` (CUDA-graph Reuse steps over the serving slot pool),
``compiled`` (phase programs of an engine), ``artifacts`` (the per-backend loaders)
and ``engine_dir`` (opening
an engine directory)."""
