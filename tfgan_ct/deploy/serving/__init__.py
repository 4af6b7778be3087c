"""TensorFlow Serving deployment of the exports: `artefacts` (models.config,
warm-up requests), `client` (REST predict), `grpc_client` (gRPC predict, with
the messages of `messages`), `standin` and `standin_grpc` (a local stand-in
server for tests and demos, not TF Serving, running the models of `loaded`).
Importing it loads no TensorFlow.
"""
from tfgan_ct.deploy.serving.artefacts import models_config, write_models_config, write_warmup
from tfgan_ct.deploy.serving.client import model_status, predict
from tfgan_ct.deploy.serving.errors import ServingError
from tfgan_ct.deploy.serving.standin import make_standin, start_standin

__all__ = ["ServingError", "make_standin", "model_status", "models_config", "predict", "start_standin",
           "write_models_config", "write_warmup"]
