"""faasrm center side: simulator, baselines, learning, export, trainer service, evaluation.

May import ``sidecar`` (the shared decision core); ``sidecar`` never imports this package.
"""
