// Player input -> the protocol's held keys and look motion. Four sources, merged:
//   keyboard  WASD + IJKL as in the action DSL (w/s forward/back, a/d yaw, i/k pitch, j/l strafe),
//             arrows as aliases (up/down = w/s, left/right = a/d); physical key positions (event.code),
//             so the layout works on AZERTY too. Only while `target` has focus.
//   mouse     look with pointer lock (a click on `target` asks for it); Esc releases it.
//   gamepad   left stick move/strafe, right stick look, d-pad as w/s/a/d.
//   touch     an on-screen joystick (move/strafe) and a look pad (drag to turn).
// `onInput(keys, {dx, dy})` is called when the held set changes and when look motion is pending
// (at most every MOTION_MS); repeating held keys is the SDK's job.

const KEY_CODES = {
  KeyW: "w", KeyS: "s", KeyA: "a", KeyD: "d", KeyI: "i", KeyK: "k", KeyJ: "j", KeyL: "l",
  ArrowUp: "w", ArrowDown: "s", ArrowLeft: "a", ArrowRight: "d",
};
const MOTION_MS = 50; // look motion is batched this long (mousemove fires at 60-1000 Hz)
const MOUSE_STEPS_PER_PIXEL = 0.1; // one step turns as far as one frame of a held key (0.6 deg)
const TOUCH_STEPS_PER_PIXEL = 0.25; // fingers travel less than mice
const STICK_STEPS_PER_SECOND = 16; // a full right stick turns as fast as a held a/d at 16 fps
const STICK_DEADZONE = 0.2;
const STICK_PRESS = 0.5; // left stick deflection that counts as a held key
const JOYSTICK_PRESS = 0.35; // on-screen joystick deflection (fraction of its radius) that counts
const GAMEPAD_POLL_MS = 33;

export const isTouchDevice = () => window.matchMedia("(any-pointer: coarse)").matches;

export class Controls {
  /** `target`: a focusable element (tabindex) over the video; `touch`: {joystick, knob, lookPad} or null. */
  constructor(target, onInput, touch = null) {
    this.target = target;
    this.onInput = onInput;
    this.sources = { keyboard: new Set(), gamepad: new Set(), touch: new Set() };
    this.keys = [];
    this._codes = new Set(); // event.code of the mapped keys down now
    this.motion = { dx: 0, dy: 0 };
    this._motionTimer = null;
    this._gamepadTimer = null;
    this._lastPoll = 0;
    this._listeners = [];

    this._on(target, "keydown", (e) => this._key(e, true));
    this._on(target, "keyup", (e) => this._key(e, false));
    this._on(target, "blur", () => this._setSource("keyboard", [])); // keys must not stick when focus leaves
    this._on(target, "click", () => {
      target.focus();
      if (!isTouchDevice() && target.requestPointerLock) Promise.resolve(target.requestPointerLock()).catch(() => {});
    });
    this._on(document, "mousemove", (e) => {
      if (document.pointerLockElement === target) this._look(e.movementX * MOUSE_STEPS_PER_PIXEL, -e.movementY * MOUSE_STEPS_PER_PIXEL);
    });
    this._on(document, "visibilitychange", () => {
      if (document.hidden) for (const name of Object.keys(this.sources)) this._setSource(name, []);
    });
    this._on(window, "gamepadconnected", () => this._startGamepad());
    if (navigator.getGamepads && [...navigator.getGamepads()].some(Boolean)) this._startGamepad();
    if (touch) this._attachTouch(touch);
  }

  get pointerLocked() {
    return document.pointerLockElement === this.target;
  }

  _on(node, type, fn) {
    node.addEventListener(type, fn);
    this._listeners.push(() => node.removeEventListener(type, fn));
  }

  _key(event, down) {
    const key = KEY_CODES[event.code];
    if (!key || event.ctrlKey || event.metaKey || event.altKey) return;
    event.preventDefault(); // arrows must not scroll the page
    down ? this._codes.add(event.code) : this._codes.delete(event.code);
    // An arrow and its letter are one key: it stays held while either is down.
    this._setSource("keyboard", [...this._codes].map((code) => KEY_CODES[code]));
  }

  _setSource(name, keys) {
    if (name === "keyboard" && !keys.length) this._codes.clear();
    this.sources[name] = new Set(keys);
    const merged = [...new Set(Object.values(this.sources).flatMap((s) => [...s]))].sort();
    if (merged.join() === this.keys.join()) return;
    this.keys = merged;
    this._flush();
  }

  _look(dx, dy) {
    this.motion.dx += dx;
    this.motion.dy += dy;
    if (!this._motionTimer) this._motionTimer = setTimeout(() => this._flush(), MOTION_MS);
  }

  _flush() {
    clearTimeout(this._motionTimer);
    this._motionTimer = null;
    const motion = this.motion;
    this.motion = { dx: 0, dy: 0 };
    this.onInput(this.keys, motion);
  }

  // -- gamepad ------------------------------------------------------------------------------------
  _startGamepad() {
    if (this._gamepadTimer) return;
    this._lastPoll = performance.now();
    this._gamepadTimer = setInterval(() => this._pollGamepad(), GAMEPAD_POLL_MS);
  }

  _pollGamepad() {
    const now = performance.now();
    const dt = (now - this._lastPoll) / 1000;
    this._lastPoll = now;
    const pad = [...navigator.getGamepads()].find(Boolean);
    if (!pad) {
      clearInterval(this._gamepadTimer);
      this._gamepadTimer = null;
      this._setSource("gamepad", []);
      return;
    }
    const axis = (i) => (Math.abs(pad.axes[i] || 0) > STICK_DEADZONE ? pad.axes[i] : 0);
    const pressed = (i) => !!(pad.buttons[i] && pad.buttons[i].pressed);
    const keys = [];
    if (axis(1) < -STICK_PRESS || pressed(12)) keys.push("w");
    if (axis(1) > STICK_PRESS || pressed(13)) keys.push("s");
    if (axis(0) < -STICK_PRESS) keys.push("j");
    if (axis(0) > STICK_PRESS) keys.push("l");
    if (pressed(14)) keys.push("a");
    if (pressed(15)) keys.push("d");
    this._setSource("gamepad", keys);
    const [rx, ry] = [axis(2), axis(3)];
    if (rx || ry) this._look(rx * STICK_STEPS_PER_SECOND * dt, -ry * STICK_STEPS_PER_SECOND * dt);
  }

  // -- touch --------------------------------------------------------------------------------------
  _attachTouch({ joystick, knob, lookPad }) {
    let stickPointer = null;
    const moveStick = (e) => {
      const box = joystick.getBoundingClientRect();
      const radius = box.width / 2;
      let x = (e.clientX - box.left - radius) / radius;
      let y = (e.clientY - box.top - radius) / radius;
      const length = Math.hypot(x, y);
      if (length > 1) [x, y] = [x / length, y / length];
      knob.style.transform = `translate(${x * radius * 0.6}px, ${y * radius * 0.6}px)`;
      const keys = [];
      if (y < -JOYSTICK_PRESS) keys.push("w");
      if (y > JOYSTICK_PRESS) keys.push("s");
      if (x < -JOYSTICK_PRESS) keys.push("j");
      if (x > JOYSTICK_PRESS) keys.push("l");
      this._setSource("touch", keys);
    };
    const releaseStick = (e) => {
      if (e.pointerId !== stickPointer) return;
      stickPointer = null;
      knob.style.transform = "";
      this._setSource("touch", []);
    };
    this._on(joystick, "pointerdown", (e) => {
      stickPointer = e.pointerId;
      joystick.setPointerCapture(e.pointerId);
      moveStick(e);
    });
    this._on(joystick, "pointermove", (e) => e.pointerId === stickPointer && moveStick(e));
    this._on(joystick, "pointerup", releaseStick);
    this._on(joystick, "pointercancel", releaseStick);

    const last = new Map(); // pointerId -> [x, y] on the look pad
    this._on(lookPad, "pointerdown", (e) => {
      lookPad.setPointerCapture(e.pointerId);
      last.set(e.pointerId, [e.clientX, e.clientY]);
    });
    this._on(lookPad, "pointermove", (e) => {
      const previous = last.get(e.pointerId);
      if (!previous) return;
      last.set(e.pointerId, [e.clientX, e.clientY]);
      this._look((e.clientX - previous[0]) * TOUCH_STEPS_PER_PIXEL, -(e.clientY - previous[1]) * TOUCH_STEPS_PER_PIXEL);
    });
    for (const type of ["pointerup", "pointercancel"]) this._on(lookPad, type, (e) => last.delete(e.pointerId));
  }

  /** Stop listening and release every key (sends one last empty input). */
  destroy() {
    for (const off of this._listeners) off();
    this._listeners = [];
    clearInterval(this._gamepadTimer);
    clearTimeout(this._motionTimer);
    if (this.pointerLocked) document.exitPointerLock();
    for (const name of Object.keys(this.sources)) this.sources[name] = new Set();
    if (this.keys.length) {
      this.keys = [];
      this.onInput([], { dx: 0, dy: 0 });
    }
  }
}
