"""layerlb: LoadBalancer resources in, layer-4 and layer-7 load balancers out.

The shared core: the API models (`api`), their validation (`validation`, `rules`), the CRDs (`crd`),
the Plan (`plan`, `resolve`) and its renderers (`render`), and the command line (`cli`).
"""

__version__ = "0.1.0"
