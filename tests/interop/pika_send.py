#!/usr/bin/env python
# RabbitMQ tutorial one, "Hello World!" (send.py), verbatim but for the connection
# parameters: the gateway's AMQP port and a JWT as the password (AMQP_PORT, AMQP_TOKEN).
import os

import pika

connection = pika.BlockingConnection(
    pika.ConnectionParameters(host='127.0.0.1', port=int(os.environ['AMQP_PORT']),
                              credentials=pika.PlainCredentials('any', os.environ['AMQP_TOKEN'])))
channel = connection.channel()

channel.queue_declare(queue='hello')

channel.basic_publish(exchange='', routing_key='hello', body='Hello World!')
print(" [x] Sent 'Hello World!'")
connection.close()
