#!/usr/bin/env bash
# Start reward-ocr and REPLICAS host-published replicas (compose profile `scale`), wait until Docker
# reports each healthy, and print the OCR_URL that lists every instance's host address, for a trainer
# running on the host (`make train-local`). Used by `make scale-ocr REPLICAS=N`.
#
#   scripts/scale_ocr.sh 3
#   COMPOSE="docker-compose -p myproject" scripts/scale_ocr.sh 3   # another compose command or project
set -euo pipefail
replicas=${1:?usage: scripts/scale_ocr.sh REPLICAS}
read -r -a compose <<< "${COMPOSE:-docker compose}"
wait_s=${HEALTHY_WITHIN_S:-300}

"${compose[@]}" --profile scale up -d --scale reward-ocr-replica="$replicas" reward-ocr reward-ocr-replica >&2

containers=$("${compose[@]}" --profile scale ps -q reward-ocr reward-ocr-replica)
deadline=$((SECONDS + wait_s))
for container in $containers; do
  until [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "scale_ocr: container $container not healthy within ${wait_s} s (docker logs $container)" >&2
      exit 1
    fi
    sleep 2
  done
done

# `port` prints the published address, e.g. 127.0.0.1:50061 (0.0.0.0 when BIND_ADDRESS exposes it).
address() { "${compose[@]}" --profile scale port "$@" | sed 's/^0\.0\.0\.0:/127.0.0.1:/'; }
grpc=$(address reward-ocr 50051)
http=$(address reward-ocr 18082)
for i in $(seq 1 "$replicas"); do
  grpc+=",$(address --index="$i" reward-ocr-replica 50051)"
  http+=",$(address --index="$i" reward-ocr-replica 18082)"
done
echo "OCR_URL=grpc://$grpc"
echo "# or over HTTP/JSON: OCR_URL=http://$http"
