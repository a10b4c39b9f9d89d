"""A local invoker with real serverless functions (issue 7): real cgroups, real worker processes.

``functions``  eleven real functions with an input-size parameter and their users' sizes
``worker``     the long-lived worker process a container holds (one JSON line per invocation)
``invoker``    containers (v1 cgroup + worker) and the asyncio trace replay, with sidecar hooks
``real``       ``faasrm bench real`` and ``faasrm demo``: managers in turn, RFET table, JSON,
               plots (flags in ``sidecar/cli.py``; operator page ``docs/invoker.md``)
``curves``     ``faasrm bench curves``: time against CPU quota and memory, working set against
               input (``docs/duration-model.md``)
``agreement``  ``faasrm bench agreement``: a real run replayed in the simulator, side by side
               (``docs/agreement.md``)

Not needed on production invoker hosts; needs root and writable cgroup v1 hierarchies.
"""
