"""Generation: the authors' label-conditioned discrete flow-matching prior over any trained
tokenizer's codes (docs/generation.md).

* :mod:`~dvae.prior.tokens` - :class:`TokenSpace`: a tokenizer's codes as the prior's
  categories (FSQ: one per dimension, masked to its levels);
* :mod:`~dvae.prior.network` - :class:`FlowTransformer`, the authors' DiT, its loss through
  the fused log-probability op;
* :mod:`~dvae.prior.flow` - the training path and the Euler sampler (with classifier-free
  guidance);
* :mod:`~dvae.prior.train` - ``dvae prior train`` (:class:`PriorTrainer`);
* :mod:`~dvae.prior.generate` - :func:`open_prior`, sampling, the evaluation;
* :mod:`~dvae.prior.metrics` - Fréchet distance, precision/recall and label accuracy in a
  classifier's features (one channel) or FID (three).
"""

from .config import PriorConfig, prior_config
from .flow import euler_sample, sample_path
from .generate import Prior, evaluate_prior, open_prior
from .network import FlowTransformer
from .tokens import TokenSpace

__all__ = ["FlowTransformer", "Prior", "PriorConfig", "TokenSpace", "euler_sample",
           "evaluate_prior", "open_prior", "prior_config", "sample_path"]
