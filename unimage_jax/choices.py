"""The accepted values of the config's enumerated fields, each tuple in one place.

Why a module of its own: config validation stays free of jax (a bad sweep fails in milliseconds),
while the modules that implement the choices (attention dispatch, layer stacking, the flow
sampler) import jax; both sides import the names from here, so neither pulls in the other.
"""

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # config.model.param_dtype / compute_dtype
REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attention_out")  # jax policies: model/stacking.py
ATTENTION_IMPLS = ("xla", "xla_flash", "pallas_tpu", "pallas_gpu", "auto")  # attention/dispatch.py
XLA_ATTENTION_IMPLS = ("xla", "xla_flash")  # plain XLA: partitioned by GSPMD, no shard_map or interpret mode
CONTEXT_PARALLEL = ("all_gather", "ring")  # config.model.context_parallel: attention/context_parallel.py
AUTOENCODERS = ("pixel", "flux_vae")
FLOW_PREDICTIONS = ("velocity", "x0")  # what llm2vae predicts (config.model.flow_prediction)
SCHEDULES = ("cosine", "constant", "linear")  # learning-rate schedules: training/optimizer.py
PARAM_GROUPS = ("und_expert", "gen_expert", "embeddings", "lm_head", "latent_io", "connector", "vit")
INFERENCE_MODES = ("auto", "interleaved", "disentangled")  # config.inference.mode
# config.data.keyframe_caption: the no-loss text before each noised keyframe (prompt_layout.caption_lines)
KEYFRAME_CAPTIONS = ("none", "place", "subject_place", "cast_place")
RENORM_TYPES = ("global", "channel", "text_channel")  # guidance renormalisation: inference/flow.py
