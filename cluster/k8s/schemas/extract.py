"""Write the openAPIV3Schema of each served version of a CustomResourceDefinition as JSON.

    python cluster/k8s/schemas/extract.py CRD.yaml [CRD.yaml ...]

For every version of every CRD given (a file may hold several YAML documents), this writes
`<group>_<version>_<kind in lower case>.json` next to this script: the version's
`schema.openAPIV3Schema`, unchanged, as compact JSON. tests/test_k8s_manifests.py finds
a custom resource's schema by that name. Only the versions listed with --version are
written (default: v1). See README.md in this folder for where the CRDs come from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crds", nargs="+", type=Path)
    parser.add_argument("--version", action="append", default=None,
                        help="CRD version to write (repeatable; default: v1)")
    args = parser.parse_args()
    wanted = set(args.version or ["v1"])
    for path in args.crds:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version["name"] not in wanted:
                    continue
                schema = version["schema"]["openAPIV3Schema"]
                out = HERE / f"{group}_{version['name']}_{kind.lower()}.json"
                out.write_text(json.dumps(schema, separators=(",", ":")) + "\n")
                print(f"{path}: {group}/{version['name']} {kind} -> {out.name}")


if __name__ == "__main__":
    main()
