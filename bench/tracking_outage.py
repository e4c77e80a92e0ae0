"""What a tracking server's outage costs a run: points logged by MLflowSink while the server is unreachable
for 5 s and 20 s (a TCP gate in front of a local `mlflow server`), and how long a stage's /health probe takes
against a refused and a silent server. Prints JSON.

    python -m bench.tracking_outage
"""
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import servers  # noqa: E402  (the test suite's server helpers: mlflow server, Gate)
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.tracking import MLflowSink, probe  # noqa: E402
from xbmcore.events import make_event  # noqa: E402

base = Path(tempfile.mkdtemp(prefix="xbm-outage-"))
srv = servers.start_mlflow_server(f"sqlite:///{base / 'm.db'}", base)
out = {}
try:
    port = int(srv.uri.rsplit(":", 1)[1])
    dead = f"http://127.0.0.1:{servers.free_port()}"
    t = time.monotonic()
    try: probe(dead)
    except OSError: pass
    out["probe_refused_s"] = round(time.monotonic() - t, 3)
    g0 = servers.Gate(port); g0.set("slow")
    t = time.monotonic()
    try: probe(f"http://127.0.0.1:{g0.port}")
    except OSError: pass
    out["probe_silent_s"] = round(time.monotonic() - t, 3)
    g0.close()
    for outage in (5, 20):
        gate = servers.Gate(port); gate.set("up")
        client = MlflowClient(f"http://127.0.0.1:{gate.port}")
        direct = MlflowClient(srv.uri)
        rid = direct.create_run(direct.create_experiment(f"o{outage}")).info.run_id
        sink = MLflowSink(client, rid, flush_s=0.1)
        n = lambda: len(direct.get_metric_history(rid, "val/recall_at_1"))
        for s in range(1, 11):
            sink.emit(make_event("eval", s, split="val", metrics={"recall@1": s / 100}))
        while n() < 10: time.sleep(0.1)
        gate.set("down")
        for s in range(11, 21):
            sink.emit(make_event("eval", s, split="val", metrics={"recall@1": s / 100}))
        time.sleep(outage)
        gate.set("up"); back = time.monotonic()
        while n() < 20 and time.monotonic() - back < 300: time.sleep(0.2)
        out[f"outage_{outage}s"] = {"points_after": n(), "of": 20, "arrived_s_after_back": round(time.monotonic() - back, 1),
                                    "dropped": sink.dropped}
        sink.close(); gate.close()
finally:
    servers.stop(srv.proc)
print(json.dumps(out))
