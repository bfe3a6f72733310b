"""Tests of the sans-I/O MQTT codec and Azure topic rules."""
