"""The data build's tokenizing spread over a Ray cluster (``data.engine: ray``).

The driver reads and mixes the sources exactly as the local build does (:class:`.ingest.Mix`),
sends each batch of documents to one of a pool of Ray actors (one per CPU of the cluster, or
``data.num_proc``), and packs and writes the encoded batches in their order. Hence the shards
and the manifest are byte for byte those of the local build, whatever the number of nodes or
actors, and a task that fails (a lost node, a killed actor) is run again by Ray
(``max_task_retries``) without a shard being written twice: only the driver writes, in order.

The actors load the tokenizer from its JSON text (sent once per actor), run the same encoder
function as the local build's processes, single-threaded, one per CPU.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: batches in flight per actor: enough to hide the round trip, bounded so memory stays flat
IN_FLIGHT_PER_ACTOR = 2


def _actor_class():
    import ray

    @ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)
    class TokenizerActor:
        def __init__(self, tokenizer_json: str, sep_id: int):
            import os
            import tempfile

            from . import build

            fd, path = tempfile.mkstemp(suffix=".json", prefix="ptft-tokenizer-")
            with os.fdopen(fd, "w") as fh:
                fh.write(tokenizer_json)
            build._init_encoder(path, sep_id, False)
            os.unlink(path)

        def encode(self, texts: list[str], splits: list[str]) -> dict:
            from . import build

            return build._encode(texts, splits)

        def node(self) -> str:
            import ray

            return ray.get_runtime_context().get_node_id()

    return TokenizerActor


class RayEncoder:
    """Encodes batches in order on ``num_actors`` Ray actors (default: the cluster's CPUs)."""

    def __init__(self, tokenizer_json: Path, sep_id: int, num_actors: int | None = None):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("data.engine=ray needs a Ray session (ptft data build --address, or ray.init())")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.num_actors = max(1, num_actors or cpus)
        actor = _actor_class()
        text = Path(tokenizer_json).read_text()
        self.actors = [actor.options(scheduling_strategy="SPREAD").remote(text, sep_id) for _ in range(self.num_actors)]
        self.nodes = sorted(set(ray.get([a.node.remote() for a in self.actors])))
        log.info("tokenizing on %d Ray actors over %d node(s)", self.num_actors, len(self.nodes))

    def map(self, batches: Iterator) -> Iterator[tuple[object, dict]]:
        import ray

        pending: collections.deque = collections.deque()
        limit = IN_FLIGHT_PER_ACTOR * self.num_actors
        for i, b in enumerate(batches):
            pending.append((b, self.actors[i % self.num_actors].encode.remote(b.texts, b.splits)))
            if len(pending) >= limit:
                done, ref = pending.popleft()
                yield done, ray.get(ref)
        while pending:
            done, ref = pending.popleft()
            yield done, ray.get(ref)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
