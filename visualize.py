"""Write one self-contained HTML page that shows a puzzle dataset and, optionally, a model's predictions.

    python visualize.py data_path=data/sudoku6                                  # browse the test split
    python visualize.py data_path=data/sudoku6 predictions=checkpoints/<project>/<run>/step_N out=viewer.html
    python visualize.py data_path=data/arc-aug-1000 predictions=<dir>/predictions.npz limit=2000
    python visualize.py data_path=data/maze-30x30-hard-1k --serve port=8000     # serve on 127.0.0.1 instead

Keys (key=value or --key value):
  data_path    a built puzzle dataset (dataset/build_*_dataset.py)
  predictions  evaluate.py's predictions.npz, a training eval's eval_outputs.npz, or a directory holding one
  out          the HTML file to write (default viewer.html); written to a temporary file, then renamed
  split        dataset split to show (default test)
  kind         auto | sudoku | maze | arc | grid (default auto: from the dataset's encoding)
  limit        show a seeded random sample of at most N puzzles (for very large sets)
  seed         the sample's seed (default 0)
  title        page title (default <dataset> / <split>)
  port         with --serve: the port on 127.0.0.1 (default 8000; 0 = any free port)

The page needs no network and no server: open it from disk in any current browser. With predictions it
shows input, target and prediction side by side with wrong cells framed, exact or not, the Q-halt
confidence and the segments used; filter all/wrong/right, sort by confidence, search by puzzle id,
keyboard navigation, a segment slider when the outputs hold per-segment answers (evaluate.py writes them;
in training set eval_save_segments=true), and for ARC the demonstration pairs and the voted answers per
task with pass/fail."""
from __future__ import annotations

import argparse
import sys
import time

from utils.schema import ConfigError

OPTIONS = ("data_path", "predictions", "out", "split", "kind", "limit", "seed", "title", "port")
INT_OPTIONS = ("limit", "seed", "port")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from utils.schema import apply_key_values
    parser = argparse.ArgumentParser(prog="visualize.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value, keys: " + ", ".join(OPTIONS))
    for key in OPTIONS:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int if key in INT_OPTIONS else str)
    parser.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 instead of writing a file")
    args = parser.parse_intermixed_args(argv)  # key=value words may come after --serve
    apply_key_values(args, args.overrides, OPTIONS, ints=INT_OPTIONS)
    if not args.data_path:
        raise ConfigError("data_path=<a built puzzle dataset> is required")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"'limit' must be >= 1, got {args.limit}")
    args.out = args.out or "viewer.html"
    args.split = args.split or "test"
    args.kind = (args.kind or "auto").lower()
    args.seed = 0 if args.seed is None else args.seed
    args.port = 8000 if args.port is None else args.port
    return args


def serve(html: str, port: int) -> None:
    """Serve the page from memory on 127.0.0.1 until Ctrl-C."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    body = html.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path not in ("/", "/index.html"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving the viewer on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def run(args: argparse.Namespace) -> str:
    from utils import viewer
    t0 = time.perf_counter()
    payload = viewer.build_payload(args.data_path, split=args.split, predictions=args.predictions, kind=args.kind,
                                   limit=args.limit, seed=args.seed, title=args.title)
    html = viewer.render_html(payload)
    size = len(html.encode("utf-8"))
    s = payload["summary"]
    what = f"{s['items']} puzzles ({payload['style']['kind']})"
    if payload["sampled"]:
        what += f", a sample of {s['predicted'] or s['examples']}"
    if "exact" in s:
        what += f", exact accuracy {100 * s['exact']:.1f}%"
    if s.get("segments"):
        what += f", {s['segments']} segments"
    if size > viewer.SIZE_NOTE_BYTES and not args.serve:
        print(f"note: the page will be {size / 2**20:.0f} MB (over {viewer.SIZE_NOTE_BYTES // 2**20} MB; browsers "
              f"open it slowly); add limit=N to sample fewer puzzles", file=sys.stderr, flush=True)
    if args.serve:
        print(f"viewer: {what}, {size / 2**20:.1f} MB, built in {time.perf_counter() - t0:.1f} s", flush=True)
        serve(html, args.port)
        return html
    out = viewer.write_atomic(html, args.out)
    print(f"wrote {out} ({size / 2**20:.1f} MB): {what}; built in {time.perf_counter() - t0:.1f} s. "
          f"Open it in a browser (no server needed).", flush=True)
    return html


def main(argv: list[str] | None = None) -> None:
    from utils.data import data_errors
    from utils.viewer import ViewerError
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except (ConfigError, ViewerError, OSError) + data_errors() as e:  # OSError: e.g. out= not writable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing partial was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
