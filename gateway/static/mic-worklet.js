// The caller page's microphone: an AudioWorkletProcessor that turns the AudioContext's
// float samples (at the context's rate, usually 48 kHz) into 20 ms frames of 16-bit PCM at
// the rate negotiated with the gateway, and posts each frame (an ArrayBuffer) to the page.
//
// Resampling is by area averaging: each output sample is the mean of the input over the
// span of time it covers (fractional samples weighted). When downsampling this is a box
// low-pass filter, so speech energy above the new Nyquist rate is damped rather than folded
// back at full strength; when upsampling it degrades to sample-and-hold.
//
// While muted it sends silence at the same pace: the gateway hears the end of a turn in the
// silence, and expects audio to flow like a microphone's.

class MicFrames extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.outRate = opts.targetRate || 16000;
    this.frameSamples = Math.round(this.outRate * (opts.frameMs || 20) / 1000);
    this.step = sampleRate / this.outRate;  // input samples per output sample
    this.frame = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.acc = 0;      // sum of input over the current output sample's span so far
    this.accLen = 0;   // how much of the span (in input samples) has been summed
    this.muted = false;
    this.port.onmessage = (event) => {
      if (event.data && typeof event.data.muted === "boolean") this.muted = event.data.muted;
    };
  }

  emit(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.frame[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
    if (this.filled === this.frameSamples) {
      const buffer = this.frame.buffer;
      this.port.postMessage(buffer, [buffer]);
      this.frame = new Int16Array(this.frameSamples);
      this.filled = 0;
    }
  }

  process(inputs) {
    const channels = inputs[0];
    // No input connected yet (or it ended): nothing to send this quantum.
    if (!channels || channels.length === 0) return true;
    const mono = channels[0];
    const step = this.step;
    for (let i = 0; i < mono.length; i++) {
      let sample = this.muted ? 0 : mono[i];
      if (!this.muted && channels.length > 1) {
        sample = 0;
        for (let c = 0; c < channels.length; c++) sample += channels[c][i];
        sample /= channels.length;
      }
      let left = 1;  // this input sample's remaining weight
      while (this.accLen + left >= step) {
        const take = step - this.accLen;
        this.acc += sample * take;
        left -= take;
        this.emit(this.acc / step);
        this.acc = 0;
        this.accLen = 0;
      }
      this.acc += sample * left;
      this.accLen += left;
    }
    return true;
  }
}

registerProcessor("voicegate-mic-frames", MicFrames);
