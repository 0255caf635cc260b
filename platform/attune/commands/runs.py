"""attune runs [--experiment NAME] [--uri URI]: the latest tracked runs and search trials, newest
first, with their losses and registry entries (`mlflow ui` shows them in full).

    attune runs
"""

from datetime import datetime

HELP = "list tracked training runs and search trials (MLflow)"


def add_arguments(parser) -> None:
    parser.add_argument("--experiment", default="attune", help="MLflow experiment (tracking.experiment)")
    parser.add_argument("--uri", default=None, help="tracking URI (default: tracking.uri's default: "
                        "$MLFLOW_TRACKING_URI, else sqlite under $ATTUNE_HOME/mlflow)")
    parser.add_argument("--limit", type=int, default=20, help="at most this many runs")


def run(args) -> int:
    from attune.recipe import TrackingConfig
    from attune.tracking import list_runs, tracking_uri

    uri = tracking_uri(TrackingConfig(uri=args.uri, experiment=args.experiment))
    rows = list_runs(uri, args.experiment, args.limit)
    print(f"[attune] experiment {args.experiment!r} in {uri}: {len(rows)} runs, newest first")
    if not rows:
        return 0
    header = f"{'run':<10} {'name':<22} {'status':<9} {'started':<16} {'loss':>8} {'eval_loss':>9}  entry"
    print(header)
    for r in rows:
        started = datetime.fromtimestamp(r["started"] / 1000).strftime("%Y-%m-%d %H:%M")
        name = f"{r['search']}/{r['name']}" if r["search"] else r["name"]
        print(f"{r['run_id'][:8]:<10} {name[:22]:<22} {r['status']:<9} {started:<16} "
              f"{_num(r['loss']):>8} {_num(r['eval_loss']):>9}  {r['entry'] or '-'}")
    return 0


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"
