"use strict";
// Audio for speech recognition: a microphone recording or an uploaded file, decoded by the
// browser and resampled to what Whisper reads (16 kHz mono), sent as a 16-bit PCM WAV.
(function () {
  const RATE = 16000;

  async function toWav16k(blob) {
    const bytes = await blob.arrayBuffer();
    const decoded = await new AudioContext().decodeAudioData(bytes);
    const frames = Math.max(1, Math.ceil(decoded.duration * RATE));
    const offline = new OfflineAudioContext(1, frames, RATE);
    const source = offline.createBufferSource();
    source.buffer = decoded;
    source.connect(offline.destination);
    source.start();
    const mono = (await offline.startRendering()).getChannelData(0);
    return new Blob([wavBytes(mono)], { type: "audio/wav" });
  }

  function wavBytes(samples) {
    const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
    const text = (at, s) => [...s].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
    text(0, "RIFF");
    view.setUint32(4, 36 + samples.length * 2, true);
    text(8, "WAVE");
    text(12, "fmt ");
    view.setUint32(16, 16, true); // PCM header size
    view.setUint16(20, 1, true); // PCM
    view.setUint16(22, 1, true); // mono
    view.setUint32(24, RATE, true);
    view.setUint32(28, RATE * 2, true); // bytes per second
    view.setUint16(32, 2, true); // bytes per frame
    view.setUint16(34, 16, true); // bits per sample
    text(36, "data");
    view.setUint32(40, samples.length * 2, true);
    samples.forEach((x, i) => {
      const v = Math.max(-1, Math.min(1, x));
      view.setInt16(44 + i * 2, v < 0 ? v * 0x8000 : v * 0x7fff, true);
    });
    return view.buffer;
  }

  // Start recording; the returned function stops it and resolves to the recording (a Blob).
  async function startRecording() {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.ondataavailable = (e) => chunks.push(e.data);
    const stopped = new Promise((resolve) => {
      recorder.onstop = () => {
        stream.getTracks().forEach((t) => t.stop());
        resolve(new Blob(chunks, { type: recorder.mimeType }));
      };
    });
    recorder.start();
    return () => {
      recorder.stop();
      return stopped;
    };
  }

  window.speechAudio = { toWav16k, startRecording };
})();
