"""Kubernetes manifests for the product, generated from the configuration profile.

``python -m deploy.generate`` writes ``deploy/manifests/``: plain YAML and kustomizations
(``kubectl apply -k deploy/manifests/base``), the monitoring pieces, and the KEDA and Redis
alternatives. See ``deploy/README.md``.
"""
