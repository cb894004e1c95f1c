// Prime: CT clamp samples streamed at a fixed rate.
//
// Protocol `stream` of docs/serial-protocols.md. After reset it prints the banner
//   # wattbus-stream rate=2000 channels=1\n
// then, forever, one line per block of SAMPLES_PER_LINE sample instants:
//   <seq>:<v>,<v>,...,<v>*<CS>\n
// seq: 0..65535, +1 per block, wrapping; a block that could not be sent still uses its seq,
// so the Pi sees the gap. Values: raw ADC counts, interleaved by instant (a0,b0,a1,b1,...).
// CS: two uppercase hex digits, the XOR of every byte before `*` (as NMEA).
//
// Sampling: Timer1 in CTC mode interrupts at exactly SAMPLE_RATE_HZ (16 MHz / 8 / 1000 =
// 2000 Hz) and the ISR converts every channel, so the sample instants do not jitter with the
// time Serial takes. The ISR fills one buffer while loop() prints the other (double
// buffering). Board: Arduino Uno / Nano (ATmega328P, 16 MHz): Timer1 and ADC registers are
// that chip's; Timer0 stays with millis().
//
// Baud (the doc): 1 channel at 2 kHz is ~9.5 kB/s, within 115200 baud; 2 or 3 channels need
// 250000 or 500000. Both are exact divisors of 16 MHz, and the Uno's 16U2 and CH340 bridges
// handle them. Set the port's `baud` in serial-ingest to match.

#ifndef CHANNELS
#define CHANNELS 1 // CTs on A0, then A1, A2
#endif
#ifndef SAMPLE_RATE_HZ
#define SAMPLE_RATE_HZ 2000
#endif
#ifndef SAMPLES_PER_LINE
#define SAMPLES_PER_LINE 20 // instants per line: one line per 10 ms at 2 kHz
#endif
#ifndef BAUD
#if CHANNELS == 1
#define BAUD 115200
#elif CHANNELS == 2
#define BAUD 250000
#else
#define BAUD 500000
#endif
#endif

#if CHANNELS < 1 || CHANNELS > 3
#error "CHANNELS must be 1, 2 or 3"
#endif
#if (F_CPU / 8 / SAMPLE_RATE_HZ) < 100 || (F_CPU / 8 / SAMPLE_RATE_HZ) > 65536
#error "SAMPLE_RATE_HZ out of Timer1's range with prescaler 8"
#endif

#define VALUES_PER_LINE (SAMPLES_PER_LINE * CHANNELS)

static uint16_t blocks[2][VALUES_PER_LINE];
static uint16_t blockSeq[2];
// Written by the ISR only.
static volatile uint8_t fillBuf = 0;
static volatile uint8_t fillIdx = 0;
static volatile uint16_t nextSeq = 0;
// The buffer loop() may print, or -1. The ISR sets it, loop() clears it when done printing:
// while it is set, the ISR fills the other buffer; if that fills too before loop() is done,
// the block is dropped (its seq is used up, so the Pi counts it lost).
static volatile int8_t readyBuf = -1;

// One conversion, started by hand: the ISR must not wait on analogRead's bookkeeping.
// With the ADC clock at 16 MHz / 32 = 500 kHz a conversion takes 26 us, so three channels
// fit easily in the 500 us between samples; 500 kHz is the top of the range where the
// ATmega328P datasheet still promises close to 10-bit accuracy.
static inline uint16_t convert(uint8_t ch) {
  ADMUX = _BV(REFS0) | (ch & 0x07); // AVcc reference, channel ch
  ADCSRA |= _BV(ADSC);
  while (ADCSRA & _BV(ADSC)) {
  }
  return ADC;
}

ISR(TIMER1_COMPA_vect) {
  uint8_t b = fillBuf;
  uint8_t i = fillIdx;
  for (uint8_t ch = 0; ch < CHANNELS; ch++) {
    blocks[b][i++] = convert(ch);
  }
  if (i < VALUES_PER_LINE) {
    fillIdx = i;
    return;
  }
  fillIdx = 0;
  uint16_t seq = nextSeq++;
  if (readyBuf < 0) {
    blockSeq[b] = seq;
    readyBuf = b;
    fillBuf = b ^ 1;
  }
  // else: overrun, refill the same buffer; `seq` is lost on purpose.
}

// The line being built; worst case "65535:" + 60 × "1023," + "*XX\n".
static char out[8 + VALUES_PER_LINE * 5 + 4];
static uint16_t outLen;
static uint8_t outXor;

static void put(char c) {
  out[outLen++] = c;
  outXor ^= (uint8_t)c;
}

static void putNumber(uint16_t v) {
  char digits[5];
  uint8_t n = 0;
  do {
    digits[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v > 0);
  while (n > 0) {
    put(digits[--n]);
  }
}

static const char HEX_DIGITS[] = "0123456789ABCDEF";

static void sendBlock(uint8_t b) {
  outLen = 0;
  outXor = 0;
  putNumber(blockSeq[b]);
  put(':');
  for (uint16_t i = 0; i < VALUES_PER_LINE; i++) {
    if (i > 0) {
      put(',');
    }
    putNumber(blocks[b][i]);
  }
  // The checksum covers every byte before `*`.
  uint8_t cs = outXor;
  out[outLen++] = '*';
  out[outLen++] = HEX_DIGITS[cs >> 4];
  out[outLen++] = HEX_DIGITS[cs & 0x0F];
  out[outLen++] = '\n'; // `\n` only: the doc's line end for stream lines
  Serial.write((const uint8_t *)out, outLen);
}

void setup() {
  Serial.begin(BAUD);
  // print, not println: the banner ends in `\n` like every stream line.
  Serial.print(F("# wattbus-stream rate="));
  Serial.print(SAMPLE_RATE_HZ);
  Serial.print(F(" channels="));
  Serial.print(CHANNELS);
  Serial.print('\n');

  ADCSRA = _BV(ADEN) | _BV(ADPS2) | _BV(ADPS0); // enable, prescaler 32
  DIDR0 = (uint8_t)((1 << CHANNELS) - 1);       // no digital input buffers on the CT pins

  noInterrupts();
  TCCR1A = 0;
  TCCR1B = _BV(WGM12) | _BV(CS11); // CTC on OCR1A, prescaler 8: 2 MHz
  TCNT1 = 0;
  OCR1A = (uint16_t)(F_CPU / 8 / SAMPLE_RATE_HZ - 1);
  TIMSK1 = _BV(OCIE1A);
  interrupts();
}

void loop() {
  int8_t b = readyBuf;
  if (b >= 0) {
    sendBlock((uint8_t)b);
    readyBuf = -1;
  }
}
