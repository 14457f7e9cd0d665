"""Ray Serve app: FastAPI ingress + a batched classifier deployment (``raydebias.serve.app:build``)."""
