"""The pure decision core: no I/O, no asyncio, no torch.

The simulator, the trainer and the daemon all decide through these modules, so a policy
trained in simulation sees exactly the features, masks and actions it will see on a host.
"""
