"""A stand-in for Optimum Neuron's training surface (0.4: its own NeuronTrainer loop) on the CPU.

It drives the callbacks through transformers' own CallbackHandler, TrainerState,
TrainerControl and DefaultFlowCallback, in the order optimum-neuron 0.4's
`NeuronTrainer._train` calls them (on_train_begin with the model, optimizer and
scheduler it built; per step on_step_begin, on_step_end, the log, then the save and
on_save when control.should_save, then the stop when control.should_training_stop),
refuses `train(resume_from_checkpoint=...)` as 0.4 does, reads its dataset through
`_get_train_sampler` (a RandomSampler unless overridden) and writes a checkpoint the
way its `_save_checkpoint` lays it out: the model (with tensor parallelism also the
optimizer) under shards/ through neuronx_distributed.trainer.save_checkpoint, else
optimizer.pt, then scheduler.pt and trainer_state.json. `neuronx_distributed.trainer`
is stood in for too: save_checkpoint / load_checkpoint of one process's state.

The stand-in trains one process on the rows of the whole data-parallel group (its
batch is per_device_train_batch_size x the data-parallel degree), a real tiny HF model
in float32 with dropout, AdamW and the LR schedule of transformers.get_scheduler.

torch_xla is stood in for with the device RNG's rules (pytorch/xla
xla_graph_executor.cpp and torch's lazy graph executor): a random op advances the
running seed (kSeedAdd + kSeedMul x seed), every mark_step moves the seed on
(1012031 + seed x 7012063) and restarts the running seed from it; get_rng_state
returns the running seed, set_rng_state sets both. The trainer marks steps where 0.4's
`_train` does (before each step, after on_step_end, before a save, on a stop) and runs
the save as 0.4 does, as a step closure at the next mark_step. Each step records its
random draws (Python, numpy, torch CPU, one device draw) in `draws`.
"""
from __future__ import annotations

import json
import random
import types
from pathlib import Path

import numpy
import torch
from transformers import get_scheduler
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerControl, TrainerState
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, TrainOutput

from neuron_workers.backends import hf


_MASK = (1 << 64) - 1


class StandInXlaModel:
    """torch_xla.core.xla_model's RNG, step marks, step closures and rendezvous, on the CPU."""

    def __init__(self) -> None:
        self.seed = self.running_seed = 101
        self.closures: list = []
        self.rendezvous_tags: list[str] = []

    def draw(self) -> int:
        """What a random op on the device takes: the running seed, advanced."""
        self.running_seed = (2531011 + 214013 * self.running_seed) & _MASK
        return self.running_seed

    def get_rng_state(self, device=None) -> int:
        return self.running_seed

    def set_rng_state(self, seed: int, device=None) -> None:
        self.seed = self.running_seed = int(seed) & _MASK

    def mark_step(self) -> None:
        self.seed = self.running_seed = (1012031 + self.seed * 7012063) & _MASK
        closures, self.closures = self.closures, []
        for closure in closures:
            closure()

    def add_step_closure(self, closure) -> None:
        self.closures.append(closure)

    def rendezvous(self, tag: str) -> None:
        self.rendezvous_tags.append(tag)

    def module(self) -> types.ModuleType:
        xm = types.ModuleType("torch_xla.core.xla_model")
        for name in ("get_rng_state", "set_rng_state", "mark_step", "add_step_closure", "rendezvous"):
            setattr(xm, name, getattr(self, name))
        return xm


class StandInOptimum:
    def __init__(self, version: str = "0.4.5", dropout: float = 0.1) -> None:
        self.version = version
        self.dropout = dropout
        self.calls: dict = {"loads": [], "saves": []}
        self.xm = StandInXlaModel()

    def modules(self) -> dict[str, types.ModuleType]:
        test = self

        class TrnConfig(types.SimpleNamespace):
            @property
            def model_parallelism_enabled(self) -> bool:
                return self.tensor_parallel_size > 1

        class NeuronTrainingArguments:
            def __init__(self, **kwargs):
                test.calls["args"] = dict(kwargs)
                self.__dict__.update(kwargs)
                self.trn_config = TrnConfig(tensor_parallel_size=kwargs["tensor_parallel_size"],
                                            zero_1=kwargs["zero_1"])
                self.data_parallel = test.world_size // kwargs["tensor_parallel_size"]
                self.logging_first_step, self.logging_strategy = False, IntervalStrategy.STEPS
                self.eval_strategy, self.eval_delay = IntervalStrategy.NO, 0
                self.save_strategy = SaveStrategy(kwargs["save_strategy"])

        class NeuronTrainer:
            def __init__(self, model, args, train_dataset=None, callbacks=None):
                test.calls["trainer"] = {"dataset": train_dataset}
                test.trainer = self
                self.model, self.args, self.train_dataset = model, args, train_dataset
                self.callback_handler = CallbackHandler([DefaultFlowCallback(), *(callbacks or [])], model, None,
                                                        None, None)
                self.state, self.control = TrainerState(), TrainerControl()
                self.batches: list[torch.Tensor] = []
                self.draws: list[tuple] = []

            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.RandomSampler(self.train_dataset)

            def train(self, resume_from_checkpoint=None):
                if resume_from_checkpoint not in [False, None]:
                    raise ValueError("`resume_from_checkpoint` is not supported by the NeuronTrainer.")
                args, handler = self.args, self.callback_handler
                loader = torch.utils.data.DataLoader(self.train_dataset, sampler=self._get_train_sampler(),
                                                     batch_size=args.per_device_train_batch_size * args.data_parallel)
                self.model.train()  # setup_training: dropout on
                self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.learning_rate)
                self.lr_scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, 0, args.max_steps)
                self.state.max_steps, self.state.save_steps, self.state.logging_steps = (args.max_steps,
                                                                                       args.save_steps, 1)
                self.state.is_world_process_zero = True
                handler.optimizer, handler.lr_scheduler, handler.train_dataloader = (self.optimizer,
                                                                                     self.lr_scheduler, loader)
                self.control = handler.on_train_begin(args, self.state, self.control)
                xm = test.xm
                losses = []
                while not self.control.should_training_stop:
                    for batch in loader:
                        xm.mark_step()
                        self.control = handler.on_step_begin(args, self.state, self.control)
                        self.batches.append(batch["input_ids"])
                        self.draws.append((random.random(), float(numpy.random.rand()), float(torch.rand(())),
                                           xm.draw()))
                        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                        loss.backward()
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad()
                        self.state.global_step += 1
                        self.control = handler.on_step_end(args, self.state, self.control)
                        xm.mark_step()
                        losses.append(float(loss.detach()))
                        if self.control.should_log:
                            self.control = handler.on_log(args, self.state, self.control, {"loss": losses[-1]})
                        if self.control.should_save:
                            xm.mark_step()
                            xm.add_step_closure(self._save_closure)
                        if self.control.should_training_stop:
                            xm.mark_step()
                            break
                xm.mark_step()
                self.control = handler.on_train_end(args, self.state, self.control)
                return TrainOutput(self.state.global_step, sum(losses) / max(len(losses), 1), {})

            def _save_closure(self):
                self._save_checkpoint()
                self.control = self.callback_handler.on_save(self.args, self.state, self.control)

            def _save_checkpoint(self):
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                folder.mkdir(parents=True, exist_ok=True)
                model_parallel = self.args.trn_config.model_parallelism_enabled
                test.nxd.save_checkpoint(str(folder), tag="shards", model=self.model,
                                         optimizer=self.optimizer if model_parallel else None)
                if not model_parallel:
                    torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
                self.state.save_to_json(str(folder / "trainer_state.json"))
                test.calls["saves"].append(self.state.global_step)

            def save_model(self, path):
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "config.json").write_text("{}")

        class NeuronModelForCausalLM:
            @classmethod
            def from_pretrained(cls, path, trn_config, dtype=None):
                test.calls["model"] = {"path": path, "trn_config": trn_config, "dtype": dtype}
                torch.manual_seed(0)
                test.model = hf.load_causal_lm(path).float()
                for module in test.model.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = test.dropout
                return test.model

        def save_checkpoint(path, tag, model=None, optimizer=None, **kwargs):
            shards = Path(path) / tag / "model"
            shards.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer and optimizer.state_dict()},
                       shards / "dp_rank_00_tp_rank_00_pp_rank_00.pt")
            (Path(path) / "newest").write_text(tag)

        def load_checkpoint(path, tag=None, model=None, optimizer=None, **kwargs):
            test.calls["loads"].append({"path": path, "tag": tag, "optimizer": optimizer is not None})
            state = torch.load(Path(path) / tag / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt")
            model.load_state_dict(state["model"])
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])

        self.nxd = types.SimpleNamespace(save_checkpoint=save_checkpoint)
        root = types.ModuleType("optimum.neuron")
        root.__version__ = self.version
        root.NeuronTrainingArguments, root.NeuronTrainer = NeuronTrainingArguments, NeuronTrainer
        training = types.ModuleType("optimum.neuron.models.training")
        training.NeuronModelForCausalLM = NeuronModelForCausalLM
        nxd = types.ModuleType("neuronx_distributed.trainer")
        nxd.save_checkpoint, nxd.load_checkpoint = save_checkpoint, load_checkpoint
        xla_model = self.xm.module()
        core = types.ModuleType("torch_xla.core")
        core.xla_model = xla_model
        torch_xla = types.ModuleType("torch_xla")
        torch_xla.core = core
        return {"optimum.neuron": root, "optimum.neuron.models.training": training,
                "neuronx_distributed.trainer": nxd, "torch_xla": torch_xla, "torch_xla.core": core,
                "torch_xla.core.xla_model": xla_model}

    world_size = 1

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def trainer_state_step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["global_step"]
