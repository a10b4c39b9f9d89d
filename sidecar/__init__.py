"""faasrm node side: the invoker sidecar and the pure decision core it shares with training."""

__version__ = "0.1.0"
