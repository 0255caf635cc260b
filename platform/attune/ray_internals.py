"""Every private name of Ray that attune uses, in one place: a Ray upgrade that moves one touches
this file alone. Each name says what attune does with it and what public API Ray lacks.

    from attune.ray_internals import OpenAiIngress     # its Ray module loads here, on first use

A name loads its module when first asked for, not when this module loads: the cluster and
console code import it too, and Ray Serve reads settings from the environment when it loads
(RAY_SERVE_ENABLE_HA_PROXY, which `attune serve` sets for direct streaming). A module that must
not load Serve at import holds `ray_internals` itself and reads the name when it runs.

Beyond these names attune overrides or reads private members of Ray's classes, which no import
shows: LLMServer's in attune.serve.server, OpenAiIngress's in attune.serve.ingress (and there,
RAY_ERRORS_DISPATCH: the name of the middleware init() adds), the Serve client's `_controller`
in attune.serve.auth and attune.ui.serve_app.
"""

from __future__ import annotations

import importlib
import sys

SERVE_CONSTANTS = "ray.serve._private.constants"

# attune's name -> (Ray's module, Ray's name in it; None for the module itself)
NAMES = {
    # attune.capacity: the autoscaler's node groups (KubeRay's worker groups), whether the
    # cluster could add a node that fits; ray.nodes() lists only the nodes already there.
    "cluster_state": ("ray._private.state", "state"),
    # attune.cluster: the GCS address RAY_ADDRESS=auto stands for (the last `ray start`'s), to
    # check it answers before connecting; only ray.init resolves it, by connecting.
    "canonicalize_bootstrap_address_or_die": ("ray._private.services",
                                              "canonicalize_bootstrap_address_or_die"),
    # attune.console: print_to_stdstream, which prints the lines workers forward to the driver,
    # wrapped to filter them, and _global_node's log folder; Ray's only public switch,
    # log_to_driver, is all or nothing and no API names the log folder.
    "ray_worker": ("ray._private.worker", None),
    # attune.console: the level of Ray Data's console handler (DEFAULT_CONFIG, configure_logging);
    # in public only a whole logging config in a YAML file (RAY_DATA_LOGGING_CONFIG).
    "ray_data_logging": ("ray.data._internal.logging", None),
    # attune.serve.direct, .ingress, .local: RAY_SERVE_ENABLE_HA_PROXY and
    # RAY_SERVE_USE_GRPC_BY_DEFAULT as this process's Serve read them; no public read.
    "serve_constants": (SERVE_CONSTANTS, None),
    # attune.serve.auth, .local, attune.ui.serve_app: the running Serve's HTTP options (host, port);
    # Serve has no public read of them.
    "get_global_client": ("ray.serve.context", "_get_global_client"),
    # attune.serve.node_model: the base of LLMConfig's callback_config.callback_class, which
    # Ray LLM takes but does not export.
    "CallbackBase": ("ray.llm._internal.common.callbacks.base", "CallbackBase"),
    # attune.serve.app: the steps of ray.serve.llm.build_openai_app with the FastAPI app handed in,
    # so that attune's middleware wraps every route; the builder takes no app, init() makes it.
    "init": ("ray.llm._internal.serve.core.ingress.ingress", "init"),
    # attune.serve.app: each model's card (scores in its metadata); build_openai_app makes them
    # itself, without extra metadata.
    "to_model_metadata": ("ray.llm._internal.serve.core.configs.openai_api_models",
                          "to_model_metadata"),
    # attune.serve.ingress: /v1/models' answer, where attune lists a directory's adapters too.
    "ModelList": ("ray.llm._internal.serve.core.configs.openai_api_models", "ModelList"),
    # attune.serve.ingress: the adapters Ray finds in an object store, listed beside a
    # directory's (Ray lists only object stores).
    "get_lora_model_ids": ("ray.llm._internal.common.utils.lora_utils", "get_lora_model_ids"),
    # attune.serve.ingress: Ray's exception middleware, rewritten as plain ASGI, answers with
    # Ray's own error bodies: a validation error, any other error, the request's id.
    "handle_validation_error": ("ray.llm._internal.serve.core.ingress.middleware",
                                "_handle_validation_error"),
    "get_request_id": ("ray.llm._internal.serve.core.ingress.middleware", "get_request_id"),
    "get_response_for_error": ("ray.llm._internal.serve.utils.server_utils",
                               "get_response_for_error"),
    # attune.serve.adapters: a model id 'base:adapter' split as Ray splits it.
    "get_base_model_id": ("ray.llm._internal.common.utils.lora_utils", "get_base_model_id"),
    "get_lora_id": ("ray.llm._internal.common.utils.lora_utils", "get_lora_id"),
    # attune.serve.adapters: adapters loaded from a directory, not only from an object store:
    # Ray's loader subclassed, its answer (DiskMultiplexConfig) and adapter ids as Ray numbers
    # them; LLMServer takes a loader class but Ray exports none of these.
    "LoraModelLoader": ("ray.llm._internal.serve.utils.lora_serve_utils", "LoraModelLoader"),
    "DiskMultiplexConfig": ("ray.llm._internal.serve.core.configs.llm_config",
                            "DiskMultiplexConfig"),
    "global_id_manager": ("ray.llm._internal.common.models", "global_id_manager"),
    # attune.serve.direct: direct streaming's deployment with attune's server class and no
    # LLMRouter; Ray's public builders make it only inside their own apps.
    "build_direct_streaming_llm_deployment": ("ray.llm._internal.serve.core.ingress.builder",
                                              "_build_direct_streaming_llm_deployment"),
}


def __getattr__(name: str):
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = NAMES[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # loaded once
    return value


def loaded_serve_constants():
    """Serve's constants if this process has loaded Serve (they were read from the environment
    then), else None; nothing is loaded."""
    return sys.modules.get(SERVE_CONSTANTS)
