"""A webhook server that joins the platform's engine from a second process.

    python webhook.py --port 8080 [--tenant acme]

Run it on a node of the cluster once `engine.py start` has run. It joins the engine
with the same settings (settings.py) and turns three requests into engine calls:

    POST /orders                 body: the order (JSON)   -> {"id": ...}   creates an instance
    POST /orders/<id>/approval   body: the approval (JSON) -> {"sent": true} sends it the event
    GET  /orders/<id>                                      -> the instance's status

It never stops the engine: the engine belongs to every process that joined it.
A real platform would check who calls (tokens, signatures) before any of this.
"""

import argparse
import json
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dynwf_ray as dw
from settings import engine_options


def handler_for(workflows) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self):
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            parts = self.path.strip("/").split("/")
            try:
                if parts == ["orders"]:
                    instance = workflows.create(id=f"order-{uuid.uuid4().hex[:12]}", params=self._body())
                    return self._reply(201, {"id": instance.id})
                if len(parts) == 3 and parts[0] == "orders" and parts[2] == "approval":
                    workflows.get(parts[1]).send_event("approval", self._body())
                    return self._reply(202, {"sent": True})
            except (ValueError, dw.DynwfError) as exc:
                return self._reply(400, {"error": str(exc)})
            self._reply(404, {"error": f"no such route: POST {self.path}"})

        def do_GET(self) -> None:  # noqa: N802
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "orders":
                try:
                    return self._reply(200, workflows.get(parts[1]).status())
                except dw.DynwfError as exc:
                    return self._reply(404, {"error": str(exc)})
            self._reply(404, {"error": f"no such route: GET {self.path}"})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tenant", default="acme")
    args = parser.parse_args()
    engine = dw.Engine.start(**engine_options())  # joins the running engine
    server = ThreadingHTTPServer((args.host, args.port), handler_for(engine.binding(args.tenant)))
    print(f"webhook server for tenant {args.tenant!r} at http://{args.host}:{args.port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
