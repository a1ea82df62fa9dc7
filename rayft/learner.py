"""The training engine driven step by step by another process: the RL learner, or any caller that produces
batches itself. Same engine, same checkpoints as the Ray Train jobs; no second training loop.

    group = ActorGroup(LearnerWorker, 2, role="learner", init_args=(cfg_dump, SFTConfig, "seq_cls", 100))
    group.call(lambda a, rank: a.step.remote(objective, batches[rank]))
    group.call(lambda a, rank: a.save.remote(path))   # every rank: DeepSpeed checkpoints are collective
"""

from __future__ import annotations

from rayft.actor_group import DistributedWorker


class LearnerWorker(DistributedWorker):
    """One rank of a learner group. The engine is built lazily, after the group's process group exists."""

    def __init__(self, config: dict, config_cls: type, head: str, total_steps: int, *, reference: bool = False,
                 init_adapter: str | None = None, pad_token_id: int | None = None):
        cfg = config_cls.model_validate(config)  # rebuilt from its dump, as in every worker
        self._spec = dict(cfg=cfg, head=head, total_steps=total_steps, reference=reference,
                          init_adapter=init_adapter, pad_token_id=pad_token_id)
        self.engine = None

    def init_distributed(self, rank: int, world: int, master, backend: str = "gloo") -> int:
        import torch

        from rayft.engine import Engine
        from rayft.train_loop import quiet_libraries

        quiet_libraries()
        super().init_distributed(rank, world, master, backend)
        cfg = self._spec["cfg"]
        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        self.engine = Engine(rank=rank, world=world, device=device, **self._spec)
        return rank

    def step(self, objective, batches) -> dict:
        return self.engine.step(objective, batches)

    def apply(self, fn, *args):
        """``fn(engine, *args)`` on this rank: forwards an objective needs outside a step (the RL learner's
        old and reference log-probabilities, the critic's values). Collective under ZeRO-3: call every rank."""
        return fn(self.engine, *args)

    def evaluate(self, objective, batches) -> dict:
        return self.engine.evaluate(objective, batches)

    def save(self, path: str, extra: dict | None = None) -> int:
        if extra is not None:
            self.engine.state.extra = extra
        self.engine.save_checkpoint(path)
        return self.engine.state.step

    def load(self, path: str):
        return self.engine.load_checkpoint(path)

    def state(self):
        return self.engine.state

    def trainable_state_dict(self) -> dict:
        return self.engine.trainable_state_dict()

    # weight sync over a collective (rl/weight_sync.py): learner rank 0 is the group's rank 0, the sender

    def weight_meta(self):
        """Names, shapes and dtypes of the tensors :meth:`send_weights` sends. Collective under ZeRO-3."""
        from rayft.rl.weight_sync import tensor_meta

        return tensor_meta(self.engine.trainable_state_dict())

    def join_weight_group(self, host: str, port: int, world: int, backend: str, timeout_s: float,
                          bucket_mb: float) -> bool:
        """Rank 0 joins (or re-forms) the weight group as its sender; the other ranks have no part in it."""
        from rayft.rl.weight_sync import WeightGroup

        if self.rank != 0:
            return False
        if getattr(self, "_weight_group", None) is not None:
            self._weight_group.close()
        self._weight_group = WeightGroup(host, port, world, 0, backend, timeout_s, bucket_mb)
        return True

    def send_weights(self):
        """Every rank gathers the trainable tensors (collective under ZeRO-3); rank 0 broadcasts them."""
        tensors = self.engine.trainable_state_dict()
        return self._weight_group.send(tensors) if self.rank == 0 else None

    def save_pretrained(self, out_dir: str, tokenizer=None) -> None:
        self.engine.save_pretrained(out_dir, tokenizer)
