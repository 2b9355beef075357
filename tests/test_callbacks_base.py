"""The callback protocol's adapters: hook order, accumulation, checkpoints, plain loop = Trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from diffguide.callbacks import Callback, CallbackRunner, CallbackTrainerMixin, trainer_callback


class Recorder(Callback):
    """Records hook calls; adds a weight-decay-like term; halves gradients before each step."""

    def __init__(self, coefficient: float = 0.01):
        self.coefficient = coefficient
        self.calls: list[str] = []
        self.steps_seen: list[int] = []
        self.decay_steps = 0

    def on_train_begin(self, ctx):
        self.calls.append("train_begin")

    def on_epoch_begin(self, ctx):
        self.calls.append("epoch_begin")

    def on_step_begin(self, ctx):
        self.calls.append("step_begin")

    def loss_terms(self, ctx):
        weight = next(ctx.model.parameters())
        return {"l2": self.coefficient * weight.pow(2).sum()}

    def before_optimizer_step(self, ctx):
        self.calls.append("before_step")
        for parameter in ctx.model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(0.5)

    def after_optimizer_step(self, ctx):
        self.calls.append("after_step")
        self.steps_seen.append(ctx.step)
        self.decay_steps += 1

    def on_epoch_end(self, ctx):
        self.calls.append("epoch_end")

    def on_train_end(self, ctx):
        self.calls.append("train_end")

    def state_dict(self):
        return {"decay_steps": self.decay_steps}

    def load_state_dict(self, state):
        self.decay_steps = state["decay_steps"]


def _data(n: int = 12):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _plain_run(model, callback, epochs: int = 2, batch: int = 4):
    x, y = _data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = CallbackRunner([callback], model, optimizer, total_steps=epochs * len(x) // batch)
    runner.train_begin()
    for epoch in range(epochs):
        runner.epoch_begin(epoch)
        for start in range(0, len(x), batch):
            ctx = runner.step_begin((x[start : start + batch], y[start : start + batch]))
            ctx.outputs = model(ctx.batch[0])
            loss = runner.total_loss(torch.nn.functional.cross_entropy(ctx.outputs, ctx.batch[1]))
            loss.backward()
            runner.optimizer_step()
        runner.epoch_end()
    runner.train_end()
    return runner


def test_runner_fires_hooks_in_order_and_counts_optimizer_steps():
    recorder = Recorder()
    runner = _plain_run(torch.nn.Linear(4, 3), recorder, epochs=1, batch=6)
    step = ["step_begin", "before_step", "after_step"]
    assert recorder.calls == ["train_begin", "epoch_begin", *step, *step, "epoch_end", "train_end"]
    assert recorder.steps_seen == [0, 1] and runner.ctx.step == 2
    assert set(runner.ctx.logs) == {"loss", "l2", "total_loss"}
    assert runner.ctx.logs["total_loss"] == pytest.approx(
        runner.ctx.logs["loss"] + runner.ctx.logs["l2"], rel=1e-6
    )


def test_loss_terms_are_weighted_by_name():
    model = torch.nn.Linear(4, 3)
    runner = CallbackRunner([Recorder(coefficient=1.0)], model, torch.optim.SGD(model.parameters(), lr=0.1),
                            weights={"l2": 0.25})  # fmt: skip
    runner.step_begin(None)
    total = runner.total_loss(torch.tensor(1.0))
    assert float(total) == pytest.approx(1.0 + 0.25 * float(model.weight.pow(2).sum()))


def test_step_hooks_fire_once_per_optimizer_step_under_gradient_accumulation():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    recorder = Recorder()
    runner = CallbackRunner([recorder], model, optimizer, total_steps=3, accelerator=accelerator)
    x, y = _data()
    stepped = []
    for start in range(0, 12, 2):  # 6 micro-batches = 3 optimizer steps
        with accelerator.accumulate(model):
            ctx = runner.step_begin((x[start : start + 2], y[start : start + 2]))
            loss = runner.total_loss(torch.nn.functional.cross_entropy(model(ctx.batch[0]), ctx.batch[1]))
            accelerator.backward(loss)
            stepped.append(runner.optimizer_step())
    assert stepped == [False, True] * 3
    assert recorder.calls.count("before_step") == 3 and runner.ctx.step == 3


def test_runner_state_round_trips_through_accelerate_checkpoints(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    recorder = Recorder()
    runner = CallbackRunner([recorder], model, optimizer, accelerator=accelerator)
    runner.ctx.step, runner.ctx.epoch, recorder.decay_steps = 7, 2, 5
    accelerator.save_state(tmp_path / "state")
    runner.ctx.step, runner.ctx.epoch, recorder.decay_steps = 0, 0, 0
    accelerator.load_state(tmp_path / "state")
    assert (runner.ctx.step, runner.ctx.epoch, recorder.decay_steps) == (7, 2, 5)
    with pytest.raises(ValueError, match="callbacks' state"):
        CallbackRunner([], torch.nn.Linear(1, 1), None).load_state_dict(runner.state_dict())


class _Dataset(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.y[index]}


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _trainer(model, callback, output_dir, **overrides):
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(CallbackTrainerMixin, Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=0.1,
        lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, logging_strategy="no", seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return SequentialTrainer(
        model=model, args=TrainingArguments(**settings), train_dataset=_Dataset(),
        callbacks=[trainer_callback([callback])], optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
    )  # fmt: skip


def test_same_callback_gives_the_same_result_in_the_plain_runner_and_the_trainer(tmp_path):
    torch.manual_seed(0)
    trained = _Classifier()
    plain = copy.deepcopy(trained)
    _plain_run(plain.linear, Recorder())

    recorder = Recorder()
    _trainer(trained, recorder, tmp_path).train()
    torch.testing.assert_close(trained.linear.weight, plain.linear.weight)
    torch.testing.assert_close(trained.linear.bias, plain.linear.bias)
    assert recorder.calls.count("before_step") == 6 and recorder.calls[0] == "train_begin"


class _ItemsClassifier(_Classifier):
    """Takes ``num_items_in_batch`` (as HF language models do), so ``Trainer`` leaves the
    accumulated loss un-divided and the model normalises over the whole accumulated batch."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.linear(x)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch
        return {"loss": loss, "logits": logits}


def test_trainer_with_accumulation_and_a_num_items_model_matches_the_plain_runner(tmp_path):
    torch.manual_seed(0)
    trained = _ItemsClassifier()
    plain = copy.deepcopy(trained)
    _plain_run(plain.linear, Recorder())  # batches of 4, no accumulation
    recorder = Recorder()
    trainer = _trainer(
        trained, recorder, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    # the l2 term is a per-micro-batch mean: counted twice per step unless divided by 2
    torch.testing.assert_close(trained.linear.weight, plain.linear.weight)
    torch.testing.assert_close(trained.linear.bias, plain.linear.bias)
    assert recorder.calls.count("step_begin") == 12 and recorder.calls.count("before_step") == 6


class _TermCounter(Callback):
    def __init__(self):
        self.terms_computed = 0

    def loss_terms(self, ctx):
        self.terms_computed += 1
        return {"l2": next(ctx.model.parameters()).pow(2).sum()}


def test_trainer_evaluation_adds_no_terms_and_leaves_callback_state_untouched(tmp_path):
    torch.manual_seed(0)
    model, counter = _Classifier(), _TermCounter()
    trainer = _trainer(model, counter, tmp_path)
    trainer.train()
    assert counter.terms_computed == 6
    metrics = trainer.evaluate(_Dataset())
    assert counter.terms_computed == 6
    x, y = _data()
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model.linear(x), y))
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_trainer_resume_restores_callback_state_and_ends_where_an_uninterrupted_run_does(tmp_path):
    from diffguide.callbacks import TRAINER_STATE_FILE

    torch.manual_seed(0)
    start = _Classifier()
    uninterrupted, uninterrupted_recorder = copy.deepcopy(start), Recorder()
    _trainer(uninterrupted, uninterrupted_recorder, tmp_path / "a").train()

    first = copy.deepcopy(start)
    _trainer(first, Recorder(), tmp_path / "b", save_strategy="steps", save_steps=3).train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert torch.load(checkpoint / TRAINER_STATE_FILE, weights_only=True)["callbacks"] == [{"decay_steps": 3}]

    resumed, resumed_recorder = copy.deepcopy(start), Recorder()
    _trainer(resumed, resumed_recorder, tmp_path / "b").train(resume_from_checkpoint=str(checkpoint))
    assert resumed_recorder.decay_steps == uninterrupted_recorder.decay_steps == 6
    torch.testing.assert_close(resumed.linear.weight, uninterrupted.linear.weight)

    (checkpoint / TRAINER_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="callbacks' state would be lost"):
        _trainer(copy.deepcopy(start), Recorder(), tmp_path / "b").train(
            resume_from_checkpoint=str(checkpoint)
        )


class _ScalingAccelerator:
    """The parts of ``accelerate.Accelerator`` the runner uses, with fp16's ``GradScaler``
    (accelerate has no CPU fp16)."""

    sync_gradients = True

    def __init__(self, optimizer):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        self.optimizer = optimizer

    def register_for_checkpointing(self, obj):
        pass

    def unscale_gradients(self, optimizer=None):
        self.scaler.unscale_(self.optimizer)


class _ScaledOptimizer:
    """``AcceleratedOptimizer`` under fp16: ``step`` is ``scaler.step`` then ``scaler.update``."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class _GradientReader(Callback):
    def before_optimizer_step(self, ctx):
        self.seen = ctx.model.weight.grad.clone()


@pytest.mark.parametrize("loop_unscaled_first", [False, True])
def test_callbacks_see_unscaled_gradients_under_a_grad_scaler(loop_unscaled_first):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = _data()
    reference = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(reference(x), y).backward()

    accelerator = _ScalingAccelerator(torch.optim.SGD(model.parameters(), lr=0.1))
    reader = _GradientReader()
    optimizer = _ScaledOptimizer(accelerator.optimizer, accelerator.scaler)
    runner = CallbackRunner([reader], model, optimizer, accelerator=accelerator)
    runner.step_begin((x, y))
    accelerator.scaler.scale(runner.total_loss(torch.nn.functional.cross_entropy(model(x), y))).backward()
    if loop_unscaled_first:  # e.g. accelerator.clip_grad_norm_
        accelerator.unscale_gradients()
    runner.optimizer_step()
    torch.testing.assert_close(reader.seen, reference.weight.grad)
    torch.testing.assert_close(model.weight, reference.weight - 0.1 * reference.weight.grad)
