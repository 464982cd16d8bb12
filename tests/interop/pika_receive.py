#!/usr/bin/env python
# RabbitMQ tutorial one, "Hello World!" (receive.py), verbatim but for the connection
# parameters: the gateway's AMQP port and a JWT as the password (AMQP_PORT, AMQP_TOKEN).
import pika, sys, os

def main():
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(host='127.0.0.1', port=int(os.environ['AMQP_PORT']),
                                  credentials=pika.PlainCredentials('any', os.environ['AMQP_TOKEN'])))
    channel = connection.channel()

    channel.queue_declare(queue='hello')

    def callback(ch, method, properties, body):
        print(f" [x] Received {body}")

    channel.basic_consume(queue='hello', on_message_callback=callback, auto_ack=True)

    print(' [*] Waiting for messages. To exit press CTRL+C')
    channel.start_consuming()

if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        print('Interrupted')
        try:
            sys.exit(0)
        except SystemExit:
            os._exit(0)
