"""Test-only rank actors: the production RankActor plus hooks that inject faults, passed to
`Cluster(..., actor_cls=FaultInjectingRankActor)`."""
from cluster.actors import RankActor


class FaultInjectingRankActor(RankActor):
    def inject_fault(self, kind: str, value: float) -> None:
        """'send_delay_s' delays this rank's next KV send (a hang when longer than the
        transfer timeout)."""
        if kind != "send_delay_s":
            raise ValueError(f"unknown fault {kind!r}")
        self.worker.kv.faults[kind] = value
