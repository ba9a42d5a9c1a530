"""An MQTT instant-messaging backend: no message lost, none shown twice.

Layout, in the order data flows: protocol (topics, codec, validation) -> core
(delivery logic, sans I/O) -> store (peewee) -> transport (paho worker,
embedded amqtt broker) -> cli.  backend.client is the reference client.
"""

__version__ = "0.1.0"
