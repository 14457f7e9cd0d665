#!/usr/bin/env bash
# Submit a raydebias run as a Ray job:  deploy/submit.sh CONFIG [raydebias run args...]
#
#   RAY_ADDRESS   dashboard address of the cluster (default http://127.0.0.1:8265)
#   Token auth (Ray >= 2.52; `ray start --head` enables it by default from 2.59): the same token must be
#   visible to `ray start` and to this script, through RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
#   (`ray get-auth-token --generate` creates the file).
#
# Local example:
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')
#   ray start --head --dashboard-host 127.0.0.1
#   deploy/submit.sh configs/demo.yaml --run-dir /tmp/runs/demo
set -euo pipefail
config="${1:?usage: deploy/submit.sh CONFIG [raydebias run args...]}"
shift
cd "$(dirname "$0")/.."
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
  -- raydebias run "$config" "$@"
