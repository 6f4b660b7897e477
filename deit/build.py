"""The parts of a run, built from its configuration (:class:`deit.config.RunConfig`): device, data loaders,
model, criterion, optimiser and schedule, DDP and the EMA. ``deit.main`` calls them in that order."""
from __future__ import annotations

import dataclasses
import functools
import inspect

import PIL
import torch
from threadpoolctl import threadpool_limits
from timm.data import Mixup
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from data.decode import jpeg_decoder
from data.io import CheckpointError
from data.skip import collate_skip_bad
from data.zip_cache import ShardSampler
from deit.datasets import device_rand_augment, mixup_active, normalization
from deit.baselines import attach_dense_votes
from deit.criterion import build_criterion
from deit.device_aug import DeviceBatches
from deit.device_decode import DeviceDecoder, collate_encoded
from deit.engine import LossScaler
from deit.models import adapt_state_dict_for_finetune, create_model
from deit.preemption import WorkerSignals
from deit.releases import read_state_dict
from deit.samplers import DistributedEvalSampler, RASampler, SeededDataset, SeededSampler


@dataclasses.dataclass
class Data:
    """The data side of a run: both splits, the training sampler (its epoch and resume position are set by
    the epoch loop), the loaders (device-side steps included) and timm's Mixup/CutMix (None when off)."""
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    nb_classes: int
    sampler_train: SeededSampler
    loader_train: object
    loader_val: object
    mixup_fn: Mixup | None


def init_loader_worker(signals: WorkerSignals, _worker_id: int) -> None:
    """Each DataLoader worker: stop signals are the trainer's (deit.preemption), and one thread per BLAS pool
    (torch sets its own and OpenMP's to one in workers; OpenBLAS sizes its pool by the machine: 16 threads
    per worker on a 16-core host, for every worker)."""
    signals.install()
    threadpool_limits(1)


def build_loaders(cfg, dataset_train, dataset_val, workers: WorkerSignals):
    world, rank = cfg.world_size, cfg.rank
    if getattr(dataset_train, 'shard', None) is not None:  # ZIP cache_mode='part': each rank its own shard
        sampler_train = ShardSampler.for_dataset(dataset_train, world, seed=cfg.seed)
    elif cfg.distributed and cfg.repeated_aug:
        sampler_train = RASampler(dataset_train, world, rank, shuffle=True, seed=cfg.seed)
    elif cfg.distributed:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, world, rank, shuffle=True, seed=cfg.seed)
    else:  # an order fixed by (seed, epoch), like the distributed samplers: a resume mid-epoch finds it again
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, 1, 0, shuffle=True, seed=cfg.seed)
    sampler_train = SeededSampler(sampler_train, cfg.seed, rank)
    if cfg.distributed and cfg.dist_eval:
        sampler_val = DistributedEvalSampler(dataset_val, world, rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    # generator: the workers' base seed comes from it, not from the training process's torch stream (a new
    # loader iterator after a resume would otherwise shift that stream by one draw)
    common = dict(num_workers=cfg.num_workers, pin_memory=cfg.pin_mem and torch.cuda.is_available(),
                  persistent_workers=cfg.num_workers > 0,
                  worker_init_fn=functools.partial(init_loader_worker, workers),
                  generator=torch.Generator().manual_seed(cfg.seed))

    def collate(ds, keep_even: bool):
        if ds is dataset_train and cfg.gpu_decode:  # JPEG bytes + crop/flip draws, decoded on the device
            return functools.partial(collate_encoded, keep_even=keep_even)
        if getattr(ds, 'skip_bad', False):
            return functools.partial(collate_skip_bad, keep_even=keep_even)
        return None

    loader_train = torch.utils.data.DataLoader(SeededDataset(dataset_train), sampler=sampler_train,
                                               batch_size=cfg.batch_size,
                                               drop_last=True, collate_fn=collate(dataset_train, True), **common)
    loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * cfg.batch_size),
                                             drop_last=False, collate_fn=collate(dataset_val, False), **common)
    if not cfg.eval and len(loader_train) == 0:
        raise ValueError(f'--batch-size {cfg.batch_size} is larger than this rank\'s share of the training set '
                         f'({len(sampler_train)} samples): no full batch to train on')
    return sampler_train, loader_train, loader_val


def load_teacher(cfg, nb_classes, device):
    teacher = create_model(cfg.teacher_model, nb_classes, input_size=None)
    if not cfg.teacher_path:
        raise ValueError('--distillation-type needs --teacher-path (a checkpoint of --teacher-model)')
    teacher.load_state_dict(read_state_dict(cfg.teacher_path))
    return teacher.to(device).eval()


def setup_device(cfg) -> tuple[torch.device, bool]:
    device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if cfg.distributed and device.type == 'cuda':
        device = torch.device('cuda', cfg.gpu)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels (DeiT)
    amp = device.type == 'cuda' if cfg.amp is None else cfg.amp
    return device, amp


def loss_scaler(device: torch.device, amp: bool, dtype: torch.dtype) -> LossScaler:
    """Loss scaling only where float16 needs it (bfloat16 has float32's range)."""
    return LossScaler(device.type, enabled=amp and device.type == 'cuda' and dtype == torch.float16)


def amp_dtype(cfg, device: torch.device) -> torch.dtype:
    """--amp-dtype, else timm's default float16 on CUDA; the CPU's autocast is bfloat16."""
    if cfg.amp_dtype:
        return getattr(torch, cfg.amp_dtype)
    return torch.float16 if device.type == 'cuda' else torch.bfloat16


def build_data(cfg, dataset_train, dataset_val, device, workers: WorkerSignals) -> Data:
    """Loaders of both splits (device-side steps: --prefetcher, --device-aug, --gpu-decode) and Mixup."""
    nb_classes = cfg.nb_classes
    sampler_train, loader_train, loader_val = build_loaders(cfg, dataset_train, dataset_val, workers)
    if cfg.prefetcher:  # uint8 from the workers; normalise, erase (and --device-aug) on the device, batched
        mean, std = normalization(cfg)
        decoder = DeviceDecoder(cfg.input_size, device, dataset_train) if cfg.gpu_decode else None
        loader_train = DeviceBatches(loader_train, device, mean, std, cfg.reprob, cfg.remode, cfg.recount,
                                     rand_augment=device_rand_augment(cfg) if cfg.device_aug else None,
                                     decoder=decoder)
        loader_val = DeviceBatches(loader_val, device, mean, std)
    decode = 'torchvision.io.decode_jpeg on the device (training), ' if cfg.gpu_decode else ''
    print(f'input pipeline: JPEG decode by {decode}{jpeg_decoder()}, transforms by PIL {PIL.__version__}, '
          f'{"uint8 workers + device-side normalise/erase" if cfg.prefetcher else "float workers"}'
          f'{", RandAugment on the device" if cfg.device_aug else ""}'
          f'{", JPEG draft decoding" if cfg.jpeg_draft else ""}')
    mixup_fn = None
    if mixup_active(cfg):
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=nb_classes)
    return Data(dataset_train, dataset_val, nb_classes, sampler_train, loader_train, loader_val, mixup_fn)


def build_model(cfg, nb_classes: int, device) -> torch.nn.Module:
    model = create_model(cfg.model, nb_classes, input_size=cfg.input_size,
                         **{'drop_rate': cfg.drop, 'drop_path_rate': cfg.drop_path, **cfg.model_kwargs})
    if cfg.finetune:
        state, reset = adapt_state_dict_for_finetune(read_state_dict(cfg.finetune), model)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in reset]
        if missing or result.unexpected_keys:
            raise CheckpointError(f'--finetune {cfg.finetune} does not fit {cfg.model}: missing {missing[:8]}, '
                                  f'unexpected {result.unexpected_keys[:8]}')
        print(f'finetune from {cfg.finetune}: all weights loaded; new {reset or "nothing"}')
    if cfg.distillation_type != 'none':
        if not hasattr(model, 'set_distilled_training'):
            raise ValueError(f'--distillation-type {cfg.distillation_type} needs a distilled model '
                             f'(e.g. deit_small_distilled_patch16_224), not {cfg.model}')
        model.set_distilled_training(True)
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if patch is not None and (cfg.input_size % patch[0] or cfg.input_size < patch[0]):
        ok = max(patch[0], cfg.input_size // patch[0] * patch[0])
        raise ValueError(f'--input-size {cfg.input_size} is not a multiple of {cfg.model}\'s patch size '
                         f'{patch[0]}: pixels would be cut off; use e.g. --input-size {ok}')
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def setup_criterion(cfg, nb_classes: int, mixup_fn, device, model: torch.nn.Module | None = None):
    """deit.criterion.build_criterion with the distillation teacher loaded; printed and moved to ``device``.
    Zipf LS with dense voting gets its votes from ``model``'s training forwards."""
    teacher = load_teacher(cfg, nb_classes, device) if cfg.distillation_type != 'none' else None
    criterion, base, schedule = build_criterion(cfg, nb_classes, mixup_fn is not None, teacher)
    if getattr(base, 'dense', False):
        attach_dense_votes(model, base)
    print(f'criterion: {base}' + (f', {schedule}' if schedule else ''))
    return criterion.to(device), base, schedule


def build_optimization(cfg, model):
    """(optimizer, lr scheduler) at the configuration's lr (scaled by the images per optimizer step:
    deit.config)."""
    print(f'effective batch size {cfg.batch_size} x {cfg.world_size}'
          f'{f" x {cfg.accum_iter} accumulation steps" if cfg.accum_iter > 1 else ""} = {cfg.total_batch}; '
          f'lr {cfg.lr:.3g} ({"as given" if cfg.unscale_lr else f"{cfg.base_lr:g} x batch / 512"})')
    opt_kwargs = {'eps': cfg.opt_eps} if cfg.opt_eps is not None else {}
    if cfg.opt_betas:
        opt_kwargs['betas'] = tuple(cfg.opt_betas)
    if cfg.fused_opt:
        opt_kwargs['fused'] = True
        opt_class = get_optimizer_info(cfg.opt).opt_class
        if 'fused' not in inspect.signature(opt_class).parameters:
            raise ValueError(f'--fused-opt: torch has no fused kernel for --opt {cfg.opt} ({opt_class.__name__}); '
                             f'use adam, adamw, sgd or momentum, or drop --fused-opt')
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, layer_decay=cfg.layer_decay,
                                    **{**opt_kwargs, **cfg.opt_kwargs})
    lr_scheduler, _ = create_scheduler_v2(  # like DeiT, a run trains exactly --epochs (no cooldown appended)
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones,
        patience_epochs=cfg.patience_epochs, decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, noise=cfg.lr_noise,
        noise_pct=cfg.lr_noise_pct, noise_std=cfg.lr_noise_std, noise_seed=cfg.seed)
    return optimizer, lr_scheduler


def wrap_model(cfg, model, device):
    """DDP (its constructor broadcasts rank 0's weights), torch.compile, then the EMA from the synced weights.

    Creating the EMA before DDP would start each rank's EMA from its own random init (seed + rank).
    """
    if cfg.sync_bn and cfg.distributed:  # timm's --sync-bn: before DDP, so DDP syncs the converted model
        if device.type != 'cuda':
            raise ValueError('--sync-bn: torch synchronises BatchNorm between CUDA devices only; drop it on the CPU')
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.sync_bn:
        print('note: --sync-bn has nothing to synchronise in one process')
    ddp = model
    if cfg.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[cfg.gpu] if device.type == 'cuda'
                                                        else None)
    if cfg.torchcompile:  # after DDP, as timm; the EMA and the saved weights stay the plain module
        ddp = torch.compile(ddp, backend=cfg.torchcompile)
    model_ema = None
    if cfg.model_ema:
        model_ema = ModelEmaV3(model, decay=cfg.model_ema_decay,
                               device=torch.device('cpu') if cfg.model_ema_force_cpu else None)
    return ddp, model_ema

