"""The long-lived worker process of one container: ``python -m training.invoker.worker NAME``.

Protocol on stdin/stdout, one JSON object per line: prints ``{"ready": true}`` once warm, then for
every ``{"size": S}`` runs the function and answers ``{"ok": true, "exec_s": T}`` or
``{"ok": false, "error": "..."}``. Exits on EOF. Ignores SIGINT (the invoker owns shutdown).
"""

from __future__ import annotations

import json
import signal
import sys


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from training.invoker.functions import run, warm

    name = sys.argv[1]
    warm(name)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            exec_s, _ = run(name, float(json.loads(line)["size"]))
            reply = {"ok": True, "exec_s": exec_s}
        except MemoryError:
            reply = {"ok": False, "error": "MemoryError"}
        except Exception as exc:  # noqa: BLE001 (a function failure is an outcome)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
