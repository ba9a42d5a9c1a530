"""I/O around the core: the paho worker and the embedded amqtt broker."""
