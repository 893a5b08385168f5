"""``python -m services.exporter`` (or ``tayori exporter``): run the exporter service."""

from libs.common.runner import run_service
from services.exporter.app import build
from services.exporter.settings import ExporterSettings

if __name__ == "__main__":
    run_service(ExporterSettings, build)
