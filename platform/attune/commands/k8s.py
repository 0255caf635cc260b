"""attune k8s render OVERLAY: the final KubeRay manifests of k8s/overlays/OVERLAY, on stdout.

    attune k8s render cpu | kubectl apply -f -
    attune k8s render gpu --check          # CI: fail if serve-config.generated.yaml is stale
    attune k8s render gpu --serve-config > /tmp/serve-gpu.yaml   # for `attune promote --config`

Regenerates the overlay's serveConfigV2 from deployments/ first (so `kubectl apply -k` of the
overlay deploys the same), then builds the overlay with kustomize. Run from the repository root.
"""

import sys
from pathlib import Path

import yaml

HELP = "render the KubeRay manifests of a k8s/ overlay (cpu, gpu)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="k8s_command", required=True)
    render = sub.add_parser("render", help="print an overlay's manifests (serveConfigV2 regenerated)")
    render.add_argument("overlay", help="overlay name under k8s/overlays/, e.g. cpu or gpu")
    render.add_argument("--check", action="store_true",
                        help="fail instead of rewriting a stale serve-config.generated.yaml")
    render.add_argument("--serve-config", action="store_true",
                        help="print the overlay's Serve config (its serveConfigV2) instead")


def run(args) -> int:
    from attune import k8s

    root = Path.cwd()
    if args.serve_config:
        sys.stdout.write(yaml.safe_dump(k8s.serve_config(root, args.overlay), sort_keys=False))
        return 0
    stale = k8s.sync(root, args.overlay, check=args.check)
    if stale:
        print(f"[attune] updated k8s/overlays/{args.overlay}/{k8s.GENERATED}", file=sys.stderr)
    sys.stdout.write(k8s.build(root, args.overlay))
    return 0
