"""The trace-driven cluster simulator and its Gymnasium wrapper."""
