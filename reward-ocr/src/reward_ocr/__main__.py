"""`python -m reward_ocr`: serve the OCR reward over gRPC (GRPC_PORT) and HTTP (HTTP_PORT)."""

from deepgen_common.reward_api import reward_component
from deepgen_common.server import main
from reward_ocr.backend import OcrBackend
from reward_ocr.settings import OcrSettings

if __name__ == "__main__":
    main(OcrSettings, reward_component(OcrBackend))
