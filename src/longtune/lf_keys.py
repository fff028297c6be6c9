"""LLaMA-Factory 0.9.5's argument names, each classified against longtune: the same key here, accepted with a
notice saying what longtune does instead, or refused with the reason. README and docs/llamafactory_keys.md are
generated from these tables (scripts/gen_config_docs.py); tests/test_lf_keys.py checks every key is classified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from longtune.errors import ConfigError

LF_VERSION = "0.9.5"

# Every init field of LLaMA-Factory 0.9.5's argument dataclasses with its default there (hparams/model_args.py,
# data_args.py, finetuning_args.py, training_args.py, generating_args.py), then the fields of transformers'
# Seq2SeqTrainingArguments that its TrainingArguments inherits (read from transformers 5.24, plus warmup_ratio,
# logging_dir and save_safetensors that LLaMA-Factory's supported transformers <= 5.6 still have).
LF_DEFAULTS: dict[str, Any] = {
    # model_args
    'model_name_or_path': None, 'adapter_name_or_path': None, 'adapter_folder': None, 'cache_dir': None,
    'use_fast_tokenizer': True, 'resize_vocab': False, 'split_special_tokens': False, 'add_tokens': None,
    'add_special_tokens': None, 'new_special_tokens_config': None, 'init_special_tokens': 'noise_init', 'model_revision': 'main',
    'low_cpu_mem_usage': True, 'rope_scaling': None, 'flash_attn': 'auto', 'shift_attn': False, 'mixture_of_depths': None,
    'use_unsloth': False, 'use_unsloth_gc': False, 'enable_liger_kernel': False, 'moe_aux_loss_coef': None,
    'disable_gradient_checkpointing': False, 'use_reentrant_gc': True, 'upcast_layernorm': False, 'upcast_lmhead_output': False,
    'train_from_scratch': False, 'infer_backend': 'huggingface', 'offload_folder': 'offload', 'use_kv_cache': True,
    'use_v1_kernels': False, 'infer_dtype': 'auto', 'hf_hub_token': None, 'ms_hub_token': None, 'om_hub_token': None,
    'print_param_status': False, 'trust_remote_code': False, 'quantization_method': 'bnb', 'quantization_bit': None,
    'quantization_type': 'nf4', 'double_quantization': True, 'quantization_device_map': None, 'image_max_pixels': 589824,
    'image_min_pixels': 1024, 'image_do_pan_and_scan': False, 'crop_to_patches': False, 'video_max_pixels': 65536,
    'video_min_pixels': 256, 'video_fps': 2.0, 'video_maxlen': 128, 'use_audio_in_video': False, 'audio_sampling_rate': 16000,
    'export_dir': None, 'export_size': 5, 'export_device': 'cpu', 'export_quantization_bit': None, 'export_quantization_dataset': None,
    'export_quantization_nsamples': 128, 'export_quantization_maxlen': 1024, 'export_legacy_format': False,
    'export_hub_model_id': None, 'vllm_maxlen': 4096, 'vllm_gpu_util': 0.7, 'vllm_enforce_eager': False,
    'vllm_max_lora_rank': 32, 'vllm_config': None, 'sglang_maxlen': 4096, 'sglang_mem_fraction': 0.7, 'sglang_tp_size': -1,
    'sglang_config': None, 'sglang_lora_backend': 'triton', 'use_kt': False, 'kt_weight_path': None, 'kt_expert_checkpoint_path': None,
    'kt_use_lora_experts': None, 'kt_lora_expert_num': None, 'kt_lora_expert_intermediate_size': None,
    # data_args
    'template': None, 'dataset': None, 'eval_dataset': None, 'dataset_dir': 'data', 'media_dir': None, 'cutoff_len': 2048,
    'train_on_prompt': False, 'mask_history': False, 'streaming': False, 'buffer_size': 16384, 'mix_strategy': 'concat',
    'interleave_probs': None, 'overwrite_cache': False, 'preprocessing_batch_size': 1000, 'preprocessing_num_workers': None,
    'max_samples': None, 'eval_num_beams': None, 'ignore_pad_token_for_loss': True, 'val_size': 0.0, 'eval_on_each_dataset': False,
    'packing': None, 'neat_packing': False, 'tool_format': None, 'default_system': None, 'enable_thinking': True,
    'preserve_thinking': False, 'tokenized_path': None, 'data_shared_file_system': False,
    # finetuning_args
    'freeze_trainable_layers': 2, 'freeze_trainable_modules': 'all', 'freeze_extra_modules': None, 'additional_target': None,
    'lora_alpha': None, 'lora_dropout': 0.0, 'lora_rank': 8, 'lora_target': 'all', 'loraplus_lr_ratio': None,
    'loraplus_lr_embedding': 1e-06, 'use_rslora': False, 'use_dora': False, 'pissa_init': False, 'pissa_iter': 16,
    'pissa_convert': False, 'create_new_adapter': False, 'module_dropout': 0.0, 'oft_rank': 0, 'oft_block_size': 32,
    'oft_target': 'all', 'pref_beta': 0.1, 'pref_ftx': 0.0, 'pref_bco_weight': 0.0, 'pref_loss': 'sigmoid',
    'dpo_label_smoothing': 0.0, 'kto_chosen_weight': 1.0, 'kto_rejected_weight': 1.0, 'simpo_gamma': 0.5,
    'ppo_buffer_size': 1, 'ppo_epochs': 4, 'ppo_score_norm': False, 'ppo_target': 6.0, 'ppo_whiten_rewards': False,
    'ref_model': None, 'ref_model_adapters': None, 'ref_model_quantization_bit': None, 'reward_model': None,
    'reward_model_adapters': None, 'reward_model_quantization_bit': None, 'reward_model_type': 'lora', 'ld_alpha': None,
    'use_galore': False, 'galore_target': 'all', 'galore_rank': 16, 'galore_update_interval': 200, 'galore_scale': 2.0,
    'galore_proj_type': 'std', 'galore_layerwise': False, 'use_apollo': False, 'apollo_target': 'all', 'apollo_rank': 16,
    'apollo_update_interval': 200, 'apollo_scale': 32.0, 'apollo_proj': 'random', 'apollo_proj_type': 'std',
    'apollo_scale_type': 'channel', 'apollo_layerwise': False, 'apollo_scale_front': False, 'use_badam': False,
    'badam_mode': 'layer', 'badam_start_block': None, 'badam_switch_mode': 'ascending', 'badam_switch_interval': 50,
    'badam_update_ratio': 0.05, 'badam_mask_mode': 'adjacent', 'badam_verbose': 0, 'use_swanlab': False,
    'swanlab_project': 'llamafactory', 'swanlab_workspace': None, 'swanlab_run_name': None, 'swanlab_mode': 'cloud',
    'swanlab_api_key': None, 'swanlab_logdir': None, 'swanlab_lark_webhook_url': None, 'swanlab_lark_secret': None,
    'pure_bf16': False, 'stage': 'sft', 'finetuning_type': 'lora', 'use_llama_pro': False, 'use_adam_mini': False,
    'use_mca': False, 'use_hyper_parallel': False, 'hyper_parallel_args': None, 'use_muon': False, 'use_dft_loss': False,
    'use_asft_loss': False, 'asft_alpha': 0.1, 'use_eaft_loss': False, 'eaft_alpha': 1.0, 'freeze_vision_tower': True,
    'freeze_multi_modal_projector': True, 'freeze_language_model': False, 'compute_accuracy': False, 'disable_shuffling': False,
    'early_stopping_steps': None, 'plot_loss': False, 'include_effective_tokens_per_second': False,
    # training_args
    'ray_num_workers': 1, 'ray_init_kwargs': None, 'master_addr': None, 'master_port': None, 'enable_torch_profiler': False,
    'profiler_output_dir': None, 'profiler_wait_steps': 1, 'profiler_warmup_steps': 1, 'profiler_active_steps': 1,
    'profiler_repeat': 1, 'profiler_record_shapes': True, 'profiler_profile_memory': True, 'profiler_with_stack': True,
    'profile_modules': None, 'fp8': False, 'fp8_backend': 'auto', 'fp8_enable_fsdp_float8_all_gather': False,
    'overwrite_output_dir': False,
    # generating_args
    'do_sample': True, 'temperature': 0.95, 'top_p': 0.7, 'top_k': 50, 'num_beams': 1, 'max_length': 1024,
    'max_new_tokens': 1024, 'repetition_penalty': 1.0, 'length_penalty': 1.0, 'skip_special_tokens': True,
    # hf
    'output_dir': None, 'per_device_train_batch_size': 8, 'num_train_epochs': 3.0, 'max_steps': -1, 'learning_rate': 5e-05,
    'lr_scheduler_type': 'linear', 'lr_scheduler_kwargs': None, 'warmup_steps': 0, 'optim': 'adamw_torch_fused',
    'optim_args': None, 'weight_decay': 0.0, 'adam_beta1': 0.9, 'adam_beta2': 0.999, 'adam_epsilon': 1e-08,
    'optim_target_modules': None, 'gradient_accumulation_steps': 1, 'average_tokens_across_devices': True,
    'max_grad_norm': 1.0, 'label_smoothing_factor': 0.0, 'bf16': False, 'fp16': False, 'bf16_full_eval': False,
    'fp16_full_eval': False, 'tf32': None, 'activation_checkpointing': None, 'activation_checkpointing_kwargs': None,
    'gradient_checkpointing': None, 'gradient_checkpointing_kwargs': None, 'torch_compile': False, 'torch_compile_backend': None,
    'torch_compile_mode': None, 'use_liger_kernel': False, 'liger_kernel_config': None, 'use_cache': False,
    'neftune_noise_alpha': None, 'torch_empty_cache_steps': None, 'auto_find_batch_size': False, 'logging_strategy': 'steps',
    'logging_steps': 500, 'logging_first_step': False, 'log_on_each_node': True, 'logging_nan_inf_filter': True,
    'include_num_input_tokens_seen': 'no', 'log_level': 'passive', 'log_level_replica': 'warning', 'disable_tqdm': None,
    'report_to': 'none', 'run_name': None, 'project': 'huggingface', 'trackio_space_id': None, 'trackio_bucket_id': None,
    'trackio_static_space_id': None, 'eval_strategy': 'no', 'eval_steps': None, 'eval_delay': 0, 'per_device_eval_batch_size': 8,
    'prediction_loss_only': False, 'eval_on_start': False, 'eval_do_concat_batches': True, 'eval_use_gather_object': False,
    'eval_accumulation_steps': None, 'include_for_metrics': None, 'batch_eval_metrics': False, 'save_only_model': False,
    'save_strategy': 'steps', 'save_steps': 500, 'save_on_each_node': False, 'save_total_limit': None, 'enable_jit_checkpoint': False,
    'push_to_hub': False, 'hub_token': None, 'hub_private_repo': None, 'hub_model_id': None, 'hub_strategy': 'every_save',
    'hub_always_push': False, 'hub_revision': None, 'load_best_model_at_end': False, 'metric_for_best_model': None,
    'greater_is_better': None, 'ignore_data_skip': False, 'restore_callback_states_from_checkpoint': False,
    'full_determinism': False, 'seed': 42, 'data_seed': None, 'use_cpu': False, 'accelerator_config': None,
    'parallelism_config': None, 'dataloader_drop_last': False, 'dataloader_num_workers': 0, 'dataloader_pin_memory': True,
    'dataloader_persistent_workers': False, 'dataloader_prefetch_factor': None, 'dataloader_multiprocessing_context': None,
    'dataloader_in_order': True, 'remove_unused_columns': True, 'label_names': None, 'train_sampling_strategy': 'random',
    'length_column_name': 'length', 'ddp_find_unused_parameters': None, 'ddp_bucket_cap_mb': None, 'ddp_broadcast_buffers': None,
    'ddp_static_graph': None, 'ddp_backend': None, 'ddp_timeout': 1800, 'fsdp': None, 'fsdp_config': None,
    'deepspeed': None, 'debug': '', 'skip_memory_metrics': True, 'do_train': False, 'do_eval': False, 'do_predict': False,
    'resume_from_checkpoint': None, 'local_rank': -1, 'sortish_sampler': False, 'predict_with_generate': False,
    'generation_max_length': None, 'generation_num_beams': None, 'generation_config': None, 'warmup_ratio': 0.0,
    'logging_dir': None, 'save_safetensors': True,
    # older LLaMA-Factory names (before 0.9.4) still found in shared YAMLs
    'new_special_tokens': None,
}


@dataclass(frozen=True)
class Translation:
    """A LLaMA-Factory key that longtune takes as one of its own keys with a converted value."""

    key: str
    convert: Callable[[Any], Any]
    notice: str


TRANSLATED: dict[str, Translation] = {
    "kto_rejected_weight": Translation("kto_undesirable_weight", lambda v: v, "is longtune's kto_undesirable_weight"),
    "disable_gradient_checkpointing": Translation(
        "gradient_checkpointing", lambda v: not v, "sets gradient_checkpointing to its opposite"),
    "neat_packing": Translation(
        "packing", bool,
        "is packing: true (longtune's packed rows never attend across documents)"),
    "new_special_tokens": Translation(
        "add_special_tokens", lambda v: v, "is add_special_tokens (its LLaMA-Factory >= 0.9.4 name)"),
    "gradient_checkpointing_kwargs": Translation(
        "gradient_checkpointing", lambda v: True, "is gradient_checkpointing: true (always non-reentrant)"),
}

# Accepted; the notice says what longtune does instead. Printed only when the value differs from LLaMA-Factory's
# default (a YAML that spells out a default asks for nothing).
_NOT_NEEDED = "longtune never materialises full logits and picks its attention kernels itself"
ACCEPTED: dict[str, str] = {
    # model
    "cache_dir": "ignored: models load from local directories",
    "use_fast_tokenizer": "the fast tokenizer is always used",
    "model_revision": "ignored: models load from local directories",
    "low_cpu_mem_usage": "models always load directly in the training dtype",
    "flash_attn": "ignored: attention kernels come from attn_implementation / attention_kernel (SDPA flash on GPU)",
    "use_unsloth": f"ignored: {_NOT_NEEDED}",
    "use_unsloth_gc": "ignored: gradient_checkpointing (with offload_activations) does this",
    "enable_liger_kernel": f"ignored: {_NOT_NEEDED} (the loss runs in chunks, loss_chunk_size)",
    "use_liger_kernel": f"ignored: {_NOT_NEEDED} (the loss runs in chunks, loss_chunk_size)",
    "liger_kernel_config": f"ignored: {_NOT_NEEDED}",
    "use_reentrant_gc": "ignored: checkpointing is always non-reentrant",
    "upcast_layernorm": "ignored: norms compute in the training dtype (fp32 master weights under FSDP)",
    "upcast_lmhead_output": "ignored: the loss is always computed in float32",
    "infer_backend": "ignored by train",
    "infer_dtype": "ignored by train",
    "offload_folder": "ignored: use offload_params for CPU offload",
    "use_kv_cache": "ignored: training never uses a KV cache",
    "use_cache": "ignored: training never uses a KV cache",
    "use_v1_kernels": "ignored",
    "hf_hub_token": "ignored: models and data are local",
    "ms_hub_token": "ignored: models and data are local",
    "om_hub_token": "ignored: models and data are local",
    "print_param_status": "ignored: the run line prints trainable / total parameters",
    # data
    "preprocessing_batch_size": "ignored: tokenized once and cached",
    "ignore_pad_token_for_loss": "padding is never in the loss",
    "data_shared_file_system": "ignored: the main rank tokenizes first into the shared cache, the others read it",
    "eval_num_beams": "ignored by train",
    # finetuning
    "include_effective_tokens_per_second": "metrics.jsonl always has tokens_per_s",
    "freeze_vision_tower": "ignored: text models only",
    "freeze_multi_modal_projector": "ignored: text models only",
    "freeze_language_model": "ignored: text models only",
    # training
    "master_addr": "ignored: torchrun / MASTER_ADDR set the rendezvous",
    "master_port": "ignored: torchrun / MASTER_PORT set the rendezvous",
    "average_tokens_across_devices": "the loss is always normalised by the global token count of the step",
    "bf16_full_eval": "evaluation runs in the training dtype",
    "fp16_full_eval": "evaluation runs in the training dtype",
    "activation_checkpointing": "ignored: use gradient_checkpointing",
    "activation_checkpointing_kwargs": "ignored: checkpointing is always non-reentrant",
    "torch_compile": "ignored: the model runs eagerly",
    "torch_compile_backend": "ignored: the model runs eagerly",
    "torch_compile_mode": "ignored: the model runs eagerly",
    "torch_empty_cache_steps": "ignored",
    "logging_strategy": "logging is every logging_steps optimizer steps (and the first and last)",
    "logging_first_step": "the first step is always logged",
    "log_on_each_node": "ignored: the main rank logs",
    "logging_nan_inf_filter": "ignored: a non-finite loss stops the run",
    "include_num_input_tokens_seen": "metrics.jsonl always has tokens",
    "log_level": "ignored",
    "log_level_replica": "ignored",
    "logging_dir": "TensorBoard writes to output_dir/runs",
    "prediction_loss_only": "evaluation reports eval_loss only",
    "eval_do_concat_batches": "ignored: evaluation reports eval_loss only",
    "eval_use_gather_object": "ignored: evaluation reports eval_loss only",
    "eval_accumulation_steps": "ignored: evaluation reports eval_loss only",
    "include_for_metrics": "ignored: evaluation reports eval_loss only",
    "batch_eval_metrics": "ignored: evaluation reports eval_loss only",
    "save_on_each_node": "ignored: checkpoints go to output_dir (shared storage for multi-node)",
    "save_safetensors": "models are always saved as safetensors",
    "ignore_data_skip": "ignored: resume restores the exact data position",
    "restore_callback_states_from_checkpoint": "ignored",
    "full_determinism": "ignored: runs are deterministic from seed",
    "use_cpu": "ignored: runs on the CPU when torch sees no GPU",
    "dataloader_drop_last": "ignored: the last partial batch trains too",
    "dataloader_pin_memory": "ignored",
    "dataloader_persistent_workers": "ignored",
    "dataloader_prefetch_factor": "ignored",
    "dataloader_multiprocessing_context": "ignored",
    "dataloader_in_order": "ignored",
    "remove_unused_columns": "ignored: rows are converted by format",
    "label_names": "ignored",
    "length_column_name": "ignored",
    "ddp_find_unused_parameters": "ignored: no DDP (FSDP2 or an explicit gradient all-reduce)",
    "ddp_bucket_cap_mb": "ignored: no DDP (FSDP2 or an explicit gradient all-reduce)",
    "ddp_broadcast_buffers": "ignored: no DDP (FSDP2 or an explicit gradient all-reduce)",
    "ddp_static_graph": "ignored: no DDP (FSDP2 or an explicit gradient all-reduce)",
    "ddp_backend": "ignored: NCCL (+ gloo for CPU tensors) on GPU, gloo on CPU",
    "debug": "ignored: use --debug for tracebacks",
    "skip_memory_metrics": "metrics.jsonl always has peak_mem_gib",
    "do_eval": "evaluation runs whenever eval data exists (eval_dataset or val_size)",
    "local_rank": "ignored: ranks come from torchrun / SLURM",
    "sortish_sampler": "ignored by train",
    "predict_with_generate": "ignored by train",
    "generation_max_length": "ignored by train",
    "generation_num_beams": "ignored by train",
    "generation_config": "ignored by train",
    # generation keys: until `longtune predict` / `chat` take them, train ignores them
    "do_sample": "ignored by train", "temperature": "ignored by train", "top_p": "ignored by train",
    "top_k": "ignored by train", "num_beams": "ignored by train", "max_length": "ignored by train",
    "max_new_tokens": "ignored by train", "repetition_penalty": "ignored by train",
    "length_penalty": "ignored by train", "skip_special_tokens": "ignored by train",
}

# Refused when set to anything but LLaMA-Factory's default: "LLaMA-Factory key 'K' is not supported (why)".
_MULTIMODAL = "multimodal inputs; text models only"
_INFERENCE = "an inference-engine setting"
_EXPORT = "use `longtune export` (HF safetensors, optionally --merge-lora)"
_HUB = "no Hub access; models and data are local"
_OPTIMIZER = "an alternative optimizer; use optim"
_LOSS = "an alternative SFT loss"
_PPO = "the PPO stage is not implemented (stages: pt, sft, dpo, kto, rm)"
_PROFILER = "use `longtune bench` or torch.profiler yourself"
_QUANT = "quantized bases are not supported yet"
_TEMPLATE = "chat-template options are not supported yet"
_EVAL = "evaluation reports eval_loss only"
REFUSED: dict[str, str] = {
    # model
    "adapter_folder": "give adapter_name_or_path", "split_special_tokens": "special tokens always stay whole",
    "new_special_tokens_config": "semantic initialisation of new tokens; use add_special_tokens",
    "init_special_tokens": "new token rows start as the mean embedding",
    "shift_attn": "LongLoRA's S^2-attention; use sequence_parallel_size for long context",
    "mixture_of_depths": "mixture-of-depths conversion", "moe_aux_loss_coef": "no MoE router auxiliary loss",
    "train_from_scratch": "training starts from the given weights",
    "quantization_method": _QUANT, "quantization_type": _QUANT, "double_quantization": _QUANT,
    "quantization_device_map": _QUANT,
    **dict.fromkeys(("image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches",
                     "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video",
                     "audio_sampling_rate", "media_dir"), _MULTIMODAL),
    **dict.fromkeys(("export_dir", "export_size", "export_device", "export_quantization_bit",
                     "export_quantization_dataset", "export_quantization_nsamples", "export_quantization_maxlen",
                     "export_legacy_format", "export_hub_model_id"), _EXPORT),
    **dict.fromkeys(("vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config",
                     "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config",
                     "sglang_lora_backend"), _INFERENCE),
    **dict.fromkeys(("use_kt", "kt_weight_path", "kt_expert_checkpoint_path", "kt_use_lora_experts",
                     "kt_lora_expert_num", "kt_lora_expert_intermediate_size"), "KTransformers"),
    # data
    **dict.fromkeys(("mask_history", "tool_format", "default_system", "enable_thinking", "preserve_thinking"),
                    _TEMPLATE),
    "eval_on_each_dataset": "one eval_loss over all eval datasets",
    # finetuning
    **dict.fromkeys(("loraplus_lr_ratio", "loraplus_lr_embedding"), "LoRA+"),
    **dict.fromkeys(("pissa_init", "pissa_iter", "pissa_convert"), "PiSSA initialisation"),
    "create_new_adapter": "adapter_name_or_path continues training the given adapter",
    **dict.fromkeys(("module_dropout", "oft_rank", "oft_block_size", "oft_target"), "OFT adapters; use lora"),
    "pref_bco_weight": "BCO", "ld_alpha": "LD-DPO",
    "ref_model_adapters": "give ref_model a merged model directory",
    "ref_model_quantization_bit": _QUANT,
    **dict.fromkeys(("ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards",
                     "reward_model", "reward_model_adapters", "reward_model_quantization_bit",
                     "reward_model_type"), _PPO),
    **dict.fromkeys(("use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale",
                     "galore_proj_type", "galore_layerwise"), "GaLore"),
    **dict.fromkeys(("use_apollo", "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
                     "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise",
                     "apollo_scale_front"), "APOLLO"),
    **dict.fromkeys(("use_badam", "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval",
                     "badam_update_ratio", "badam_mask_mode", "badam_verbose"), "BAdam"),
    **dict.fromkeys(("use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
                     "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret"),
                    "SwanLab; use report_to: tensorboard or wandb"),
    "pure_bf16": "use dtype: bfloat16", "use_llama_pro": "LLaMA Pro block expansion",
    "use_adam_mini": _OPTIMIZER, "use_muon": _OPTIMIZER,
    "use_mca": "Megatron-Core; use sequence_parallel_size and FSDP2",
    **dict.fromkeys(("use_hyper_parallel", "hyper_parallel_args"), "use sequence_parallel_size and FSDP2"),
    **dict.fromkeys(("use_dft_loss", "use_asft_loss", "asft_alpha", "use_eaft_loss", "eaft_alpha"), _LOSS),
    "compute_accuracy": _EVAL, "disable_shuffling": "training data is always shuffled from seed",
    "early_stopping_steps": "no early stopping; set max_steps",
    # training
    **dict.fromkeys(("ray_num_workers", "ray_init_kwargs"), "Ray; launch with torchrun or --nproc"),
    **dict.fromkeys(("enable_torch_profiler", "profiler_output_dir", "profiler_wait_steps", "profiler_warmup_steps",
                     "profiler_active_steps", "profiler_repeat", "profiler_record_shapes", "profiler_profile_memory",
                     "profiler_with_stack", "profile_modules"), _PROFILER),
    **dict.fromkeys(("fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather"), "FP8 training; use bf16"),
    "optim_args": "optimizer arguments come from the adam_* keys",
    "optim_target_modules": "GaLore-style optimizers",
    "label_smoothing_factor": "label smoothing of the LM loss",
    "auto_find_batch_size": "set per_device_train_batch_size (see `longtune estimate`)",
    **dict.fromkeys(("trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"),
                    "Trackio; use report_to: tensorboard or wandb"),
    "eval_delay": "evaluation starts at eval_steps", "eval_on_start": "evaluation starts at eval_steps",
    **dict.fromkeys(("push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
                     "hub_always_push", "hub_revision"), _HUB),
    "enable_jit_checkpoint": "checkpoints are written every save_steps",
    **dict.fromkeys(("load_best_model_at_end", "metric_for_best_model", "greater_is_better"),
                    "final/ holds the last model"),
    "data_seed": "seed sets the data order too",
    **dict.fromkeys(("accelerator_config", "parallelism_config", "fsdp_config"),
                    "parallelism comes from sequence_parallel_size, fsdp and offload_params"),
    "train_sampling_strategy": "examples are shuffled from seed",
    "do_predict": "train does not generate",
}


def _is_default(key: str, value: Any) -> bool:
    """Whether `value` asks for nothing: LLaMA-Factory's default, null, or an empty/false value where the default
    is null (a 0 is a real value, not false)."""
    default = LF_DEFAULTS.get(key)
    if value is None or (value == default and isinstance(value, bool) == isinstance(default, bool)):
        return True
    empty = value is False or (isinstance(value, (str, list, dict)) and not value)
    return empty and (default is None or default is False or default == "")


def classify(key: str, longtune_keys: set[str] | frozenset[str]) -> str | None:
    """'same' (a longtune key), 'translated', 'notice', 'refused', or None for a key LLaMA-Factory does not have
    (and longtune neither)."""
    if key in longtune_keys:
        return "same"
    if key in TRANSLATED:
        return "translated"
    if key in ACCEPTED:
        return "notice"
    if key in REFUSED:
        return "refused"
    return None


def translate_lf_keys(values: dict[str, Any], longtune_keys: set[str] | frozenset[str],
                      where: Callable[[str], str]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Turn the LLaMA-Factory-only keys of a flat config into longtune keys: translated keys become their longtune
    key, accepted ones are dropped (with a notice when not at LLaMA-Factory's default), refused ones raise a
    ConfigError. Keys longtune has, and keys neither knows, pass through untouched. `where(key)` names the
    source of a key for messages."""
    kept: dict[str, Any] = {}
    notices: list[str] = []
    for key, value in values.items():
        kind = classify(key, longtune_keys)
        if kind in (None, "same"):
            kept[key] = value
        elif kind == "refused":
            if not _is_default(key, value):
                raise ConfigError(f"{where(key)}: LLaMA-Factory key '{key}' is not supported ({REFUSED[key]}); "
                                  f"remove it")
        elif kind == "notice":
            if not _is_default(key, value):
                notices.append(f"notice: LLaMA-Factory key '{key}': {ACCEPTED[key]}")
        else:
            t = TRANSLATED[key]
            if _is_default(key, value):
                continue  # asks for nothing; never contradicts the longtune key
            converted = t.convert(value)
            if t.key in values and values[t.key] != converted:
                raise ConfigError(f"{where(key)}: key '{key}' ({key} {t.notice}) contradicts "
                                  f"'{t.key}: {values[t.key]}'; keep one")
            kept[t.key] = converted
            notices.append(f"notice: LLaMA-Factory key '{key}' {t.notice}")
    return kept, tuple(notices)


CLASS_TITLES = {"same": "same key", "translated": "taken as a longtune key", "notice": "accepted with a notice",
                "refused": "refused unless at LLaMA-Factory's default"}


def key_table(longtune_keys: set[str] | frozenset[str]) -> list[tuple[str, str, str]]:
    """(key, class, what longtune does) for every LLaMA-Factory key, in LLaMA-Factory's order."""
    rows = []
    for key in LF_DEFAULTS:
        kind = classify(key, longtune_keys)
        what = {"same": "", "translated": TRANSLATED[key].notice if key in TRANSLATED else "",
                "notice": ACCEPTED.get(key, ""), "refused": REFUSED.get(key, "")}.get(kind or "", "")
        rows.append((key, kind or "unclassified", what))
    return rows
