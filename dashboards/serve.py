"""Show a LongRoPE study in Optuna Dashboard, with the report's figures and the factor files.

    python -m dashboards.serve --study smollm2_16k [--out runs/smollm2_16k | --storage URL] \\
        [--results FILE ...] [--host 127.0.0.1] [--port 8080] [--artifact-dir DIR]

First the figures of :func:`dashboards.figures.report_figures` are saved into the
study (``optuna_dashboard.save_plotly_graph_object``; saving again replaces them)
and ``best_factors.json`` and ``rope_parameters.json`` from the study directory
are uploaded as study artifacts (a file already uploaded with the same bytes is
not uploaded again). Then optuna-dashboard serves the study's storage on
loopback by default; ``--port 0`` picks a free port. The first line printed is
the study's dashboard URL.

The dashboard is read-only unless ``--allow-writes``: optuna-dashboard's API
deletes studies and trials and edits notes without any authentication, so every
request to ``/api/`` other than GET or HEAD is refused (403), and a ``--host``
that is not a loopback address is warned about.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
import plotly.graph_objects as go
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from dashboards.figures import report_figures
from dashboards.report import gather_results
from hpo.cli import command
from hpo.records import (
    BEST_FACTORS_FILE,
    ROPE_PARAMETERS_FILE,
    best_factors,
    load_study,
    study_dir,
)

logger = logging.getLogger("dashboards.serve")

FACTOR_FILES = (BEST_FACTORS_FILE, ROPE_PARAMETERS_FILE)
READ_METHODS = ("GET", "HEAD")
WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connections must not keep the process alive on Ctrl-C


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, fmt: str, *args) -> None:
        logger.debug(fmt, *args)


def _already_uploaded(study: optuna.Study, store: FileSystemArtifactStore, path: Path) -> bool:
    content = path.read_bytes()
    for meta in get_all_artifact_meta(study):
        if meta.filename != path.name:
            continue
        try:
            with store.open_reader(meta.artifact_id) as reader:
                if reader.read() == content:
                    return True
        except ArtifactNotFound:  # recorded in the study, but not in this artifact directory
            continue
    return False


def publish(study: optuna.Study, figures: dict[str, go.Figure], files: Sequence[Path],
            store: FileSystemArtifactStore) -> list[Path]:
    """Save ``figures`` into ``study`` under their ids and upload the ``files`` not uploaded before.

    Returns the files uploaded by this call.
    """
    for figure_id, figure in figures.items():
        optuna_dashboard.save_plotly_graph_object(study, figure, graph_object_id=figure_id)
    uploaded = []
    for path in files:
        if not _already_uploaded(study, store, path):
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
            uploaded.append(path)
    return uploaded


def read_only(app: WsgiApp) -> WsgiApp:
    """``app`` with every API request that is not GET or HEAD refused (403) before it reaches ``app``."""
    refusal = json.dumps({"reason": "this dashboard is read-only: restart python -m dashboards.serve with "
                                    "--allow-writes to change studies from it"}).encode()

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/api/") and environ.get("REQUEST_METHOD") not in READ_METHODS:
            start_response("403 Forbidden", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(refusal)))])
            return [refusal]
        return app(environ, start_response)

    return guarded


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore, host: str, port: int,
          study: optuna.Study, allow_writes: bool = False) -> None:
    """Run optuna-dashboard on ``storage`` until interrupted, read-only unless ``allow_writes``; prints the
    study's URL first."""
    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    if not allow_writes:
        app = read_only(app)
    if not is_loopback(host):
        logger.warning("serving on %s, not a loopback address: anyone who can reach it %s study %r and every "
                       "other study in its storage (no authentication)", host,
                       "can change or delete" if allow_writes else "can read", study.study_name)
    server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    print(f"Optuna Dashboard: http://{host}:{server.server_port}/dashboard/studies/{study._study_id}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _port(text: str) -> int:
    """An argparse type: a TCP port number, 0 to 65535."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {text}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dashboards.serve",
                                     description="Publish a study's figures and factor files to Optuna Dashboard "
                                                 "and serve it.")
    parser.add_argument("--study", required=True, metavar="NAME", help="study name")
    parser.add_argument("--storage", metavar="URL", help="storage URL (default: DIR/study.db)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="study output directory (default: runs/NAME)")
    parser.add_argument("--results", nargs="+", action="extend", type=Path, default=[], metavar="FILE",
                        help="evaluation tables for the figures (default: DIR/evaluation.csv, if any)")
    parser.add_argument("--artifact-dir", type=Path, metavar="DIR",
                        help="artifact store directory (default: DIR/artifacts of the study directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    parser.add_argument("--port", type=_port, default=8080, help="port; 0 picks a free one")
    parser.add_argument("--allow-writes", action="store_true",
                        help="let the dashboard delete and edit studies, trials and notes (off: read-only)")
    return parser


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directory = study_dir(args.study, args.out)
    study = load_study(args.study, args.storage, args.out)
    results = gather_results(args.results, [args.study], [directory])
    figures = report_figures([study], results)
    # a live study without a complete trial is served too, to watch it grow; it has no factors yet
    factors = best_factors(study) if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None
    artifact_dir = args.artifact_dir or directory / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir))
    with tempfile.TemporaryDirectory() as scratch:
        files = [directory / name for name in FACTOR_FILES if (directory / name).is_file()]
        if factors is not None and not any(path.name == BEST_FACTORS_FILE for path in files):
            # The study has not been through hpo.run's final step (or lives elsewhere): take its best trial now.
            files.insert(0, factors.save(Path(scratch) / BEST_FACTORS_FILE))
        uploaded = publish(study, figures, files, store)
    logger.info("saved %d figures into study %r; uploaded %s to %s", len(figures), study.study_name,
                ", ".join(p.name for p in uploaded) or "no new artifacts", artifact_dir)
    if factors is None:
        logger.info("study %r has no complete trial yet: its trials show as they finish; run this again to "
                    "publish its factors and figures once it has one", study.study_name)
    try:
        serve(study._storage, store, args.host, args.port, study, args.allow_writes)
    except KeyboardInterrupt:
        pass
    except OSError as error:  # the port is taken, or the host is not an address of this machine
        print(f"error: cannot serve on {args.host}:{args.port}: {error.strerror or error}"
              f"{' (try --port 0 for a free port)' if error.errno == errno.EADDRINUSE else ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
