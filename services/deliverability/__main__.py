"""``python -m services.deliverability`` (or ``tayori deliverability``): run the service."""

from libs.common.runner import run_service
from services.deliverability.app import build
from services.deliverability.settings import DeliverabilitySettings

if __name__ == "__main__":
    run_service(DeliverabilitySettings, build)
