// PowMon: ACS712 current sensors read on request.
//
// Protocol `request-response` of docs/serial-protocols.md:
// - the Pi writes `read \n` (any line whose first word is `read` is a request);
// - this sketch answers one line: the raw ADC value of each sensor, decimal, separated by
//   `,`, ended by Serial.println's `\r\n`: `537\r\n`, or `537,512,498\r\n` with three.
// Every other line is ignored. The Pi converts raw counts to amps (offset, sensitivity and
// supply voltage are its configuration, not this sketch's).
//
// Baud: 115200, serial-ingest's default `baud` (the doc names no rate of its own; the
// original PowMon ran at 9600, which also works if the port's `baud = 9600`).
//
// Board: Arduino Uno (ATmega328P) or Nano; any board with analogRead and Serial.

#ifndef SENSORS
#define SENSORS 1 // ACS712 outputs on A0, then A1, A2
#endif
#ifndef BAUD
#define BAUD 115200
#endif

#if SENSORS < 1 || SENSORS > 3
#error "SENSORS must be 1, 2 or 3"
#endif

// A request is a few bytes; anything longer is not one. A fixed buffer rather than String:
// no heap, so no fragmentation on a device that runs for years.
#define LINE_MAX 32

static const uint8_t PINS[3] = {A0, A1, A2};

static char line[LINE_MAX];
static uint8_t lineLen = 0;
// The current line outgrew the buffer: drop it up to its `\n`, never act on half a line.
static bool overlong = false;

static bool isSpace(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v';
}

// First word is exactly `read` (so `reading` is not a request).
static bool isRequest(const char *s, uint8_t n) {
  uint8_t i = 0;
  while (i < n && isSpace(s[i])) {
    i++;
  }
  if (n - i < 4 || s[i] != 'r' || s[i + 1] != 'e' || s[i + 2] != 'a' || s[i + 3] != 'd') {
    return false;
  }
  i += 4;
  return i == n || isSpace(s[i]);
}

static void answer() {
  for (uint8_t s = 0; s < SENSORS; s++) {
    // After the multiplexer moves to another pin the first conversion can still carry the
    // previous pin's charge (the ACS712's output is low impedance, but cheap modules add
    // RC filters): read once, throw it away.
    if (SENSORS > 1) {
      (void)analogRead(PINS[s]);
    }
    int raw = analogRead(PINS[s]);
    if (s > 0) {
      Serial.print(',');
    }
    Serial.print(raw);
  }
  Serial.println();
}

void setup() {
  Serial.begin(BAUD);
}

void loop() {
  while (Serial.available() > 0) {
    char c = (char)Serial.read();
    if (c == '\n') {
      if (!overlong && isRequest(line, lineLen)) {
        answer();
      }
      lineLen = 0;
      overlong = false;
    } else if (lineLen < LINE_MAX) {
      line[lineLen++] = c;
    } else {
      overlong = true;
    }
  }
}
