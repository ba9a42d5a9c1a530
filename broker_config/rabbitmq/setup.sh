#!/bin/sh
# Accounts and rights for the IM backend on a RabbitMQ node with rabbitmq.conf from this folder.
# Usage: IM_WORKER_PASSWORD=... ./setup.sh            (the worker's account, once)
#        ./setup.sh user alice 'her-password'          (one per user; uids without '.' here)
# Rights are docs/PROTOCOL.md section 2 as topic permissions on amq.topic (routing keys: '/' -> '.').
set -eu
CTL=${RABBITMQCTL:-rabbitmqctl}
# A user publishes only on its own send/ack/req (v1 and device topics) and its own status (and devices');
# it reads its own inbox/reply (v1 and device) and every status (the buddy list: --presence all).
USER_WRITE='^im\.u\.{username}\.(d\.[A-Za-z0-9_-]+\.)?(send|ack|req)$|^im\.status\.{username}(\.[A-Za-z0-9_-]+)?$'
USER_READ='^im\.u\.{username}\.(d\.[A-Za-z0-9_*-]+\.)?(inbox|reply)$|^im\.status\.[A-Za-z0-9_*-]+(\.[A-Za-z0-9_*-]+)?$'
# The worker writes inboxes, replies, device-aware users' derived statuses (im/status/{uid}) and the
# workers' topics; it reads (subscribes
# to) what clients send, the statuses (im/status/+, and each uid's exact status topic: the worker asks for
# retained statuses that way after a restart, as RabbitMQ sends none to wildcards) and the workers' topics;
# im.u.*.*.send (and ack, req) only to name in its log a uid with a '.' that RabbitMQ split in two. RabbitMQ closes the connection of a client
# whose SUBSCRIBE is refused, so the worker may also bind $share.* keys: its start-up probe through
# $share/im-workers/... is then granted, delivers nothing (no one may publish there), and the worker
# falls back to plain subscriptions (README.md).
WORKER_WRITE='^im\.u\.[A-Za-z0-9_-]+\.(d\.[A-Za-z0-9_-]+\.)?(inbox|reply)$|^im\.status\.[A-Za-z0-9_-]+$|^im\.worker\.'
WORKER_READ='^im\.u\.\*\.((d\.)?\*\.)?(send|ack|req)$|^im\.status\.[A-Za-z0-9_*-]+(\.[A-Za-z0-9_*-]+)?$|^im\.worker\.|^\$share\.'
# vhost rights: only the MQTT plugin's own session queues (mqtt-subscription-<client id>qos0/1) and amq.topic.
QUEUES='^mqtt-subscription-'
RW='^(amq\.topic|mqtt-subscription-.*)$'
add() {  # add(name, password, write, read)
  $CTL add_user "$1" "$2" >/dev/null 2>&1 || $CTL change_password "$1" "$2"
  $CTL set_permissions -p / "$1" "$QUEUES" "$RW" "$RW"
  $CTL set_topic_permissions -p / "$1" amq.topic "$3" "$4"
}
if [ "${1:-}" = user ]; then
  # A uid here is 1-50 of A-Z a-z 0-9 _ - : RabbitMQ turns a '.' into a topic level (docs/PROTOCOL.md 10.1).
  if ! printf '%s' "$2" | grep -Eq '^[A-Za-z0-9_-]{1,50}$'; then
    echo "error: uid '$2' cannot work beside RabbitMQ: use 1-50 of A-Z a-z 0-9 _ - (no '.')" >&2
    exit 2
  fi
  add "$2" "$3" "$USER_WRITE" "$USER_READ"
else
  $CTL delete_user guest >/dev/null 2>&1 || true   # the well-known default account
  add im-worker "${IM_WORKER_PASSWORD:?set IM_WORKER_PASSWORD}" "$WORKER_WRITE" "$WORKER_READ"
fi
