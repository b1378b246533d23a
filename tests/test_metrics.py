"""metrics.MetricWriter: a resumed run's metrics.jsonl and TensorBoard events read like one run's."""
import json
import struct

from jaxft.metrics import MetricWriter


def events(run_dir):
  """Every TensorBoard event in the run's event files (TFRecords: length, crc, Event proto, crc), oldest first."""
  from tensorboardX.proto.event_pb2 import Event
  out = []
  for path in sorted((run_dir / "tensorboard").iterdir()):
    data = path.read_bytes()
    while data:
      n = struct.unpack("<Q", data[:8])[0]
      out.append(Event.FromString(data[12:12 + n]))
      data = data[12 + n + 4:]
  return out


def test_resume_drops_the_interrupted_tail_in_both_sinks(tmp_path):
  first = MetricWriter(tmp_path)
  for step in range(1, 11):  # a run interrupted after step 10, its newest checkpoint at step 5
    first.write(step, "train", {"loss": 1.0 / step})
  first.close()
  resumed = MetricWriter(tmp_path, resume_step=5)
  resumed.write(6, "train", {"loss": 0.5})
  resumed.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  starts = [e.step for e in events(tmp_path) if e.HasField("session_log")]
  assert starts == [0, 6]  # each writer's purge marker: TensorBoard hides older files' events from that step on
  scalars = [(e.step, e.summary.value[0].simple_value) for e in events(tmp_path) if e.HasField("summary")]
  assert scalars[-1] == (6, 0.5) and len(scalars) == 11
