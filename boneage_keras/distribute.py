"""One replica or many: data-parallel training on the engine each backend already has.

``distribute.strategy: data_parallel`` trains one model on several devices (and
processes); ``train.batch_size`` stays the global batch, each replica computing on
``batch_size / replicas`` images of it.

    JAX          ``keras.distribution.DataParallel`` over the devices of this process, or
                 of several processes joined by ``jax.distributed`` (``distribute.
                 coordinator / num_processes / process_id``, else Keras' environment
                 variables KERAS_DISTRIBUTION_JOB_ADDRESSES, ..._NUM_PROCESSES,
                 ..._PROCESS_ID). Each process feeds its own shard. Batch statistics are
                 computed over the global batch (synchronized by construction).
    TensorFlow   ``tf.distribute.MirroredStrategy`` over this machine's GPUs (or
                 ``distribute.cpu_devices`` logical CPUs); ``distribute.sync_batchnorm``
                 synchronizes batch statistics. One machine only: with TF_CONFIG set
                 (MultiWorkerMirroredStrategy) it refuses: Keras 3.15's trainer fails
                 under that strategy (see _setup_tensorflow).
    torch        one process per GPU, launched by ``torchrun``; every step's gradients are
                 averaged with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) in one
                 flat all-reduce before the optimizer applies them. Batch statistics are
                 per process; the moving averages are averaged before each validation.

What ``train`` uses is one object, :class:`Replicas`: how many replicas and processes,
which process is the chief (the only one that writes), the batch each process feeds and
its shard of every epoch (:func:`shard`), and the hooks that make one model of many
(``scope``, ``prepare_model``, ``agree_text``).

    >>> replicas = setup(cfg)          # before the first model is built
    >>> with replicas.scope():
    ...     model = compile_model(build_model(cfg), cfg)
    >>> replicas.prepare_model(model)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from .backend import sublayers, substituted_values
from .config import Config, ConfigError
from .errors import BoneAgeError

log = logging.getLogger(__name__)


class DistributeError(BoneAgeError, RuntimeError):
    """Replicas cannot be set up, or a process of a distributed run was lost."""


class LostProcess(DistributeError):
    """Another process of this run went away mid-step: this one stops (its collectives'
    shut-down would wait for the lost one, so the CLI exits at once)."""

    exit_at_once = True


def shard(order: np.ndarray, global_batch: int, processes: int, index: int) -> np.ndarray:
    """Process ``index``'s part of one epoch's ``order`` (positions into the split),
    in steps of ``global_batch // processes``.

    Each global batch is cut into ``processes`` equal slices and slice ``index`` is this
    process's; the last global batch is padded with -1 (no image: weight 0) so that every
    process takes the same number of equal steps. Over all processes, every entry of
    ``order`` appears exactly once.
    """
    if global_batch % processes:
        raise ConfigError(f"config key 'train.batch_size': {global_batch} does not divide "
                          f"over {processes} processes; choose a multiple of {processes}.")
    steps = -(-len(order) // global_batch)
    padded = np.full(steps * global_batch, -1, dtype=np.int64)
    padded[:len(order)] = order
    per_process = global_batch // processes
    return padded.reshape(steps, processes, per_process)[:, index, :].reshape(-1)


@dataclass
class Replicas:
    """Where this process stands in a (possibly) distributed run."""

    backend: str
    strategy: str = "none"
    engine: str = "one device"
    replicas: int = 1
    processes: int = 1
    index: int = 0
    sync_batchnorm: bool = False
    job_id: str | None = None       # torchrun's run id: the same across its restarts
    restart: int = 0                # torchrun's restart count
    tf_strategy: Any = None
    devices: list[str] = field(default_factory=list)

    @property
    def chief(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.replicas > 1 or self.processes > 1

    @property
    def name(self) -> str:
        return f"process {self.index} of {self.processes}"

    def check_batch(self, global_batch: int) -> None:
        if global_batch % self.replicas:
            raise ConfigError(f"config key 'train.batch_size': {global_batch} does not "
                              f"divide over {self.replicas} replicas; choose a multiple "
                              f"of {self.replicas} (it is the global batch).")

    def process_batch(self, global_batch: int) -> int:
        """The batch this process feeds per step."""
        self.check_batch(global_batch)
        return global_batch // self.processes

    def scope(self) -> Any:
        """Where models are built and compiled (TensorFlow's strategy scope)."""
        return self.tf_strategy.scope() if self.tf_strategy is not None \
            else contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        """What run.json records."""
        return {"strategy": self.strategy, "engine": self.engine,
                "replicas": self.replicas, "processes": self.processes,
                "sync_batchnorm": self.sync_batchnorm, "job_id": self.job_id,
                "restart": self.restart}

    # --- hooks; the torch subclass fills them in ------------------------------------

    def prepare_model(self, model: keras.Model) -> None:
        """After compile (and after loading a resumed state): make the replicas one
        model (TensorFlow: synchronized batch statistics when asked)."""
        if self.tf_strategy is not None and self.sync_batchnorm:
            for layer in _batchnorm_layers(model):
                layer.synchronized = True

    def callbacks(self, model: keras.Model) -> list[keras.callbacks.Callback]:
        return []

    def local_values(self, model: keras.Model) -> Any:
        """Where the chief alone reads the model to save it (no collective inside)."""
        return contextlib.nullcontext()

    def local_scope(self) -> Any:
        """Where a model of this process only is built (the copy the chief saves)."""
        return contextlib.nullcontext()

    def agree_text(self, text: str) -> str:
        """The chief's ``text`` in every process (e.g. a run name with a timestamp);
        one process: ``text`` itself."""
        return text

    def lost_process_error(self, err: BaseException, run_dir: Any) -> LostProcess:
        others = [i for i in range(self.processes) if i != self.index]
        lost = f"process {others[0]}" if len(others) == 1 else \
            "one of processes " + ", ".join(map(str, others))
        return LostProcess(
            f"{self.name} lost {lost} ({str(err).splitlines()[0][:160]}); this process "
            f"stops. Everything up to the last finished epoch is in {run_dir}: continue "
            f"with `boneage train --resume {run_dir}` (any number of replicas), or let "
            "torchrun --max-restarts do it.")


def _batchnorm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in sublayers(model)
            if isinstance(layer, keras.layers.BatchNormalization)]


_current: Replicas | None = None
_current_settings: Any = None


def current() -> Replicas:
    """The replicas set up by :func:`setup` (one device if it was never called)."""
    return _current or Replicas(backend=keras.backend.backend())


def setup(cfg: Config) -> Replicas:
    """Set up ``cfg.distribute`` once per process (before the first model is built)."""
    global _current, _current_settings
    d = cfg.distribute
    if d.strategy == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("config key 'distribute.strategy': 'none', but this process was "
                          "launched as one of several (WORLD_SIZE is set, e.g. by "
                          "torchrun); set distribute.strategy=data_parallel.")
    if _current is not None:
        if d != _current_settings:
            raise DistributeError("the distribute settings cannot change within one "
                                  f"process (set up with {_current_settings}); start a "
                                  "new process for other settings.")
        return _current
    _current_settings = dataclasses.replace(d)
    backend = keras.backend.backend()
    if d.strategy == "none":
        _current = Replicas(backend=backend)
        return _current
    make = {"jax": _setup_jax, "tensorflow": _setup_tensorflow, "torch": _setup_torch}
    _current = make[backend](cfg)
    _current.sync_batchnorm = d.sync_batchnorm
    _current.check_batch(cfg.train.batch_size)
    log.info("data parallel (%s): %d replica(s) in %d process(es); this is %s%s; "
             "global batch %d, %d per replica", _current.engine, _current.replicas,
             _current.processes, _current.name, " (the chief)" if _current.chief else "",
             cfg.train.batch_size, cfg.train.batch_size // _current.replicas)
    return _current


def effective_learning_rate(cfg: Config) -> float:
    """``train.learning_rate``, scaled by batch_size / distribute.lr_batch_size when
    ``distribute.scale_lr`` is linear (Goyal et al. 2017: with warmup)."""
    lr = cfg.train.learning_rate
    if cfg.distribute.scale_lr == "linear":
        lr *= cfg.train.batch_size / cfg.distribute.lr_batch_size
    return lr


# --- JAX ---------------------------------------------------------------------------


class _JaxReplicas(Replicas):
    @contextlib.contextmanager
    def local_scope(self) -> Any:
        distribution = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(distribution)

    @contextlib.contextmanager
    def local_values(self, model: keras.Model) -> Any:
        """Over several processes a variable is a global array, and reading one (as
        saving does) is a collective that every process would have to join. The
        variables are replicated, so this process's own copy is the whole value: it
        stands in while the chief saves."""
        if self.processes == 1:
            yield
            return
        variables = list(model.variables) + [v for m in model.metrics
                                              for v in m.variables]
        if model.optimizer is not None:
            variables += list(model.optimizer.variables)
        local = [v.value.addressable_data(0) if v.value.is_fully_replicated else v.value
                 for v in variables]
        with substituted_values(variables, local), self.local_scope():
            yield   # (the local scope: saving makes variables of its own)

    def agree_text(self, text: str) -> str:
        if self.processes == 1:
            return text
        from jax.experimental import multihost_utils

        data = np.zeros(1024, np.uint8)
        raw = text.encode()[:1024]
        data[:len(raw)] = np.frombuffer(raw, np.uint8)
        agreed = np.asarray(multihost_utils.broadcast_one_to_all(data))
        return bytes(agreed.astype(np.uint8)).rstrip(b"\0").decode()


def _setup_jax(cfg: Config) -> Replicas:
    import jax

    d = cfg.distribute
    if d.cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", d.cpu_devices)
        except RuntimeError as err:
            raise DistributeError(f"distribute.cpu_devices={d.cpu_devices}: JAX already "
                                  f"started its devices ({err}).") from None
    env = os.environ
    processes = d.num_processes or int(env.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1"))
    if processes > 1:
        coordinator = d.coordinator or env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
        coordinator = coordinator.split(",")[0]
        process_id = d.process_id if d.process_id is not None else \
            env.get("KERAS_DISTRIBUTION_PROCESS_ID")
        if not coordinator or process_id is None:
            raise ConfigError("config key 'distribute.num_processes': JAX over "
                              f"{processes} processes needs distribute.coordinator "
                              "(host:port of process 0) and distribute.process_id, or "
                              "KERAS_DISTRIBUTION_JOB_ADDRESSES and "
                              "KERAS_DISTRIBUTION_PROCESS_ID.")
        if int(process_id) >= processes:
            raise ConfigError(f"config key 'distribute.process_id': {process_id} is not "
                              f"below distribute.num_processes={processes}.")
        # CPU collectives across processes (no effect on GPUs, which use NCCL)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # keras.distribution.initialize() does the same without the heartbeat time-out,
        # which is what stops the survivors when a process dies
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=processes, process_id=int(process_id),
                                   heartbeat_timeout_seconds=d.timeout_s,
                                   initialization_timeout=max(60, d.timeout_s))
    all_devices = jax.devices()
    if d.devices is not None and processes == 1:
        if d.devices > len(all_devices):
            raise ConfigError(f"config key 'distribute.devices': {d.devices} asked for, "
                              f"JAX sees {len(all_devices)} "
                              f"({', '.join(str(x) for x in all_devices)}).")
        all_devices = all_devices[:d.devices]
    distribution = keras.distribution.DataParallel(devices=all_devices,
                                                   auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)
    return _JaxReplicas(backend="jax", strategy="data_parallel",
                        engine="keras.distribution.DataParallel",
                        replicas=len(all_devices), processes=jax.process_count(),
                        index=jax.process_index(), devices=[str(x) for x in all_devices])


# --- TensorFlow --------------------------------------------------------------------


def _setup_tensorflow(cfg: Config) -> Replicas:
    import tensorflow as tf

    d = cfg.distribute
    if "TF_CONFIG" in os.environ:
        # Keras 3.15's TensorFlow trainer fails under MultiWorkerMirroredStrategy: its
        # symbolic build and its log reduction call strategy.reduce in ways that
        # strategy rejects (docs/distributed.md). Refused rather than patched.
        raise DistributeError("TF_CONFIG is set: multi-worker TensorFlow fails inside "
                              "Keras 3.15 (MultiWorkerMirroredStrategy in its trainer); "
                              "train across machines with JAX (distribute.coordinator) or "
                              "torch (torchrun --nnodes), or unset TF_CONFIG for one "
                              "machine's GPUs.")
    if d.cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * d.cpu_devices)
        except RuntimeError as err:
            raise DistributeError(f"distribute.cpu_devices={d.cpu_devices}: TensorFlow "
                                  f"already started its devices ({err}).") from None
        names = [x.name for x in tf.config.list_logical_devices("CPU")]
    else:
        names = [x.name for x in tf.config.list_logical_devices("GPU")] or \
            [x.name for x in tf.config.list_logical_devices("CPU")][:1]
    if d.devices is not None:
        if d.devices > len(names):
            raise ConfigError(f"config key 'distribute.devices': {d.devices} asked for, "
                              f"TensorFlow sees {len(names)} ({', '.join(names)}).")
        names = names[:d.devices]
    strategy = tf.distribute.MirroredStrategy(devices=names)
    return Replicas(backend="tensorflow", strategy="data_parallel",
                    engine="tf.distribute.MirroredStrategy",
                    replicas=strategy.num_replicas_in_sync, tf_strategy=strategy,
                    devices=names)


# --- torch -------------------------------------------------------------------------
# Keras 3.15 has no torch backend in keras.distribution (upstream added one after that
# release). Where Keras gains it, _setup_torch can become _setup_jax's twin
# (keras.distribution.DataParallel) and _TorchReplicas' gradient and metric hooks go.


class _TorchReplicas(Replicas):
    """torch.distributed under torchrun: one process per replica."""

    def prepare_model(self, model: keras.Model) -> None:
        import torch.distributed as dist

        if self.sync_batchnorm:
            raise ConfigError("config key 'distribute.sync_batchnorm': not available on "
                              "the torch backend (batch statistics are per process, their "
                              "moving averages averaged); use JAX or TensorFlow for "
                              "synchronized batch normalization, or set it to false.")
        variables = list(model.variables)
        if model.optimizer is not None and model.optimizer.built:
            variables += list(model.optimizer.variables)
        for v in variables:          # every replica starts from the chief's state
            dist.broadcast(v.value.data, src=0)
        world = self.processes
        optimizer = model.optimizer
        apply = optimizer.apply

        def apply_averaged(grads: list[Any], trainable_variables: Any = None) -> Any:
            return apply(_all_reduce_mean(grads, world), trainable_variables)

        optimizer.apply = apply_averaged
        results = model.get_metrics_result

        def global_results() -> dict[str, Any]:
            # metric states here are sums (totals, counts): sum them over processes,
            # read the results, then give each process its own state back
            states = [v for m in model.metrics for v in m.variables]
            local = [v.value.data.clone() for v in states]
            for v, total in zip(states, _all_reduce_sum(local)):
                v.value.data.copy_(total)
            try:
                return results()
            finally:
                for v, mine in zip(states, local):
                    v.value.data.copy_(mine)

        model.get_metrics_result = global_results

    def callbacks(self, model: keras.Model) -> list[keras.callbacks.Callback]:
        return [_AverageMovingStatistics(self.processes)]

    def agree_text(self, text: str) -> str:
        import torch.distributed as dist

        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _all_reduce_sum(tensors: list[Any]) -> list[Any]:
    """Sums over processes, one flat all-reduce per dtype."""
    import torch
    import torch.distributed as dist

    out: list[Any] = list(tensors)
    by_dtype: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(i)
    for positions in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in positions])
        dist.all_reduce(flat)
        offset = 0
        for i in positions:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view_as(tensors[i])
            offset += n
    return out


def _all_reduce_mean(tensors: list[Any], world: int) -> list[Any]:
    return [None if t is None else t / world for t in _all_reduce_sum(tensors)]


class _AverageMovingStatistics(keras.callbacks.Callback):
    """Before each validation, every process takes the mean of the processes' batch
    normalization moving averages (their batch statistics are per process on torch)."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world

    def on_test_begin(self, logs=None) -> None:
        moving = [w for layer in _batchnorm_layers(self.model)
                  for w in layer.non_trainable_weights]
        if moving:
            for w, mean in zip(moving, _all_reduce_mean([w.value.data for w in moving],
                                                        self.world)):
                w.value.data.copy_(mean)


def _setup_torch(cfg: Config) -> Replicas:
    import torch
    import torch.distributed as dist

    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1:
        if torch.cuda.device_count() > 1:
            raise ConfigError("distribute.strategy=data_parallel on torch runs one process "
                              "per GPU: launch with `torchrun --nproc_per_node "
                              f"{torch.cuda.device_count()} cli.py train ...` "
                              "(docs/distributed.md).")
        log.info("data parallel on torch without torchrun: one replica")
        return Replicas(backend="torch", strategy="data_parallel")
    cuda = torch.cuda.is_available()
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)   # "cuda" in Keras is then this process's GPU
    else:   # CPU processes share the cores: no more threads than cores each
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = datetime.timedelta(seconds=cfg.distribute.timeout_s)
    if not dist.is_initialized():
        store = None
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun shares its rendezvous store with the workers; after a restart
            # they can read the keys of the attempt before (stale addresses: gloo
            # "connectFullMesh ... Connection refused", or a hang; pytorch issue
            # #135712). Each attempt gets keys of its own.
            store = dist.PrefixStore(f"boneage/attempt_{restart}", dist.TCPStore(
                env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                timeout=timeout))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, store=store,
                                rank=int(env["RANK"]) if store is not None else -1,
                                world_size=world if store is not None else -1)
    return _TorchReplicas(backend="torch", strategy="data_parallel",
                          engine=f"torch.distributed ({'nccl' if cuda else 'gloo'})",
                          replicas=world, processes=world, index=dist.get_rank(),
                          job_id=env.get("TORCHELASTIC_RUN_ID"), restart=restart)
