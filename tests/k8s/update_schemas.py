"""Copy the v1 ``openAPIV3Schema`` of the KubeRay CRDs into ``tests/k8s/schemas/`` (compact JSON).

Run once per KubeRay upgrade; the tests read only the copies, never the CRDs:

    python tests/k8s/update_schemas.py /path/to/kuberay/crds      # dir with ray.io_ray{clusters,jobs,services}.yaml

``SOURCE.txt`` of the CRD directory (the KubeRay commit they came from), if present, is copied next to the schemas.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "schemas"
KINDS = {"raycluster": "ray.io_rayclusters.yaml", "rayjob": "ray.io_rayjobs.yaml",
         "rayservice": "ray.io_rayservices.yaml"}


def v1_schema(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def main(crd_dir: str) -> int:
    src = Path(crd_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, name in KINDS.items():
        schema = v1_schema(src / name)
        out = OUT / f"{kind}.v1.json"
        out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{src / name} -> {out} ({out.stat().st_size:,} bytes)")
    if (src / "SOURCE.txt").exists():
        shutil.copyfile(src / "SOURCE.txt", OUT / "SOURCE.txt")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
