// A ticker in a dedicated worker: one message a second to the page. A background tab's own timers are
// throttled (to once a second, and after some minutes hidden to once a minute, which would let the MQTT
// keepalive lapse); a worker's are not, and its messages wake the page. im.js falls back to setInterval
// where workers are unavailable.
const TICK_MS = 1000;  // the keepalive, resend and backoff clocks of im.js have 1 s resolution
setInterval(() => postMessage(Date.now()), TICK_MS);
