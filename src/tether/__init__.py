"""Tether: a self-hosted, secure IoT hub speaking Azure IoT Hub's wire protocols."""
__version__ = "0.1.0"
