"""Replica start-up: the model as this replica's node has it, and Ray's download step only where
something must be downloaded.

A serving config names base models the way a recipe does. attune's tiny models
(`attune:tiny-llama`, `attune:tiny-qwen2`, `attune:tiny-llama3`) are built by each node itself
(the build is deterministic), so the app carries the name and every replica resolves it on its
own node: a path resolved where the app was built (the head) would not exist on the
node a replica lands on.

Before its engine starts, every `ray.serve.llm` replica runs a Ray task on each node of its
placement group to fetch the model from a cloud mirror (s3://, gs://, ...). For a local
directory that task downloads nothing, yet it is a fresh worker process importing Ray's LLM
stack and torch: about 10 s of each replica start on 2 cores. Ray leaves the step to a callback
(`LLMConfig.callback_config`); this one turns it off for local directories.
"""

from __future__ import annotations

import os

from attune import modeling
from attune.ray_internals import CallbackBase


class ResolveModelOnNode(CallbackBase):
    """`callback_config.callback_class` of every LLMConfig attune builds."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if source in modeling.TINY_MODELS:
            source = modeling.resolve(source)  # built here, once per node
            # what the engine loads (and its tokenizer); the config caches this engine config
            self.llm_config.get_engine_config().hf_model_id = source
        if isinstance(source, str) and os.path.isdir(source):
            self.ctx.run_init_node = False
            # The one other thing the skipped task did: torch cannot create this folder itself
            # where its parent is missing (Ray's workaround in download_model_files).
            import torch

            os.makedirs(os.path.join(torch.hub._get_torch_home(), "kernels"), exist_ok=True)
