"""Start or stop the platform's engine on the cluster.

    python engine.py start   # start the engine, detached (or join the running one), and exit
    python engine.py stop    # stop it, for every process that joined it

Meant to be submitted as a Ray job with this folder as its working dir
(cluster/README.md, "A detached engine as a Ray job, and a webhook server that joins it"):

    ray job submit --address http://HEAD:8265 --working-dir cluster/platform -- python engine.py start
"""

import sys

import dynwf_ray as dw
from settings import engine_options


def main(action: str) -> None:
    if action not in ("start", "stop"):
        sys.exit(f"usage: python engine.py start|stop (got {action!r})")
    engine = dw.Engine.start(**engine_options())
    if action == "stop":
        engine.stop()
        print("engine stopped; its instances resume at the next start")
    else:
        health = engine.health()
        print(f"engine {engine.config.name!r} runs (session {health['session']}, "
              f"ready: {health['ready']})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "start")
