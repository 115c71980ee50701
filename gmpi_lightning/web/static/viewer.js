// GMPI viewer (gmpi-lightning, Apache-2.0; written for this project, no third-party code).
//
// Draws a multiplane image with WebGL2 the way gmpi_lightning/render.py:render_mpi does:
//   * plane i is the rectangle of its extent (height h_i, width w_i) at world z = d_i; texel centres at
//     linspace(-w/2, w/2, T) (align_corners=True), bilinear, transparent (all zero) outside: the textures carry
//     a one-texel zero border and clamp to it, which is grid_sample's padding_mode="zeros";
//   * one ray per pixel centre through an OpenCV camera (x right, y down, z forward) on the preset's sphere,
//     focal from the horizontal fov;
//   * colour and alpha are interpolated separately (straight, as grid_sample does) and composited back to front
//     with "over" on premultiplied colour: C = a_i c_i + (1 - a_i) C, which equals render_mpi's front-to-back
//     sum_i w_i c_i with w_i = a_i prod_{j<i} (1 - a_j); colours are not renormalised (the canvas is opaque black);
//   * depth mode: sum_i w_i z_i (z-depth along the optical axis) mapped through the same colour map (turbo, 256
//     bins, matplotlib's lookup) between the preset's near and far, times the coverage sum_i w_i, as
//     gmpi_lightning/export.py:depth_to_color.
// Compositing runs in float inside one fragment shader loop, so 96 planes lose nothing to an 8-bit framebuffer.
//
// Data: manifest.js sets window.GMPI_MANIFEST; seedNNNN.js files add window.GMPI_SEEDS[seed] = {rgb_index,
// rgb_layers, data} where data is base64 of zlib-compressed bytes: alpha (L x T x T uint16 little-endian, a/65535),
// then the distinct colour layers (K x 3 x T x T uint8). Scripts load from file:// without a server.
//
// URL: index.html?seed=0&yaw=0.2&pitch=-0.1&mode=depth&size=256. document.title becomes "ready" once the first
// frame at that camera is on screen ("error: ..." if the page cannot draw).
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const canvas = $('view');
  const M = window.GMPI_MANIFEST;
  const SEEDS = (window.GMPI_SEEDS = window.GMPI_SEEDS || {});
  const params = new URLSearchParams(window.location.search);

  function fail(message) {
    document.title = 'error: ' + message;
    $('message').textContent = message;
    throw new Error(message);
  }
  function note(message) { $('message').textContent = message; }

  if (!M) fail('manifest.js is missing: keep the exported folder together');

  // ------------------------------------------------------------------------------------------------ state
  const range = { yaw: M.yaw_range, pitch: M.pitch_range };  // [min, max]: the preset's pose range
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const number = (name, fallback) => {
    if (!params.has(name)) return fallback;
    const v = Number(params.get(name));
    if (!Number.isFinite(v)) fail(`URL parameter ${name}=${params.get(name)} is not a number`);
    return v;
  };
  const size = Math.round(number('size', M.resolution));
  if (!(size >= 8 && size <= 4096)) fail(`size=${size}: expected 8 to 4096 pixels`);
  const state = {
    seed: Math.round(number('seed', M.seeds[0])),
    yaw: number('yaw', M.yaw_mean),
    pitch: number('pitch', M.pitch_mean),
    mode: params.get('mode') || 'rgb',
    loaded: null,     // the seed whose textures are on the GPU
    drawnAt: null,    // the first frame drawn after loading: "ready" is set on the frame after it
    fps: 0,
    frameCount: 0,
  };
  if (!M.seeds.includes(state.seed)) fail(`seed ${state.seed} is not in this page (seeds ${M.seeds.join(', ')})`);
  if (state.mode !== 'rgb' && state.mode !== 'depth') fail(`mode=${state.mode}: expected rgb or depth`);
  const inRange = (v, r) => v >= r[0] - 1e-9 && v <= r[1] + 1e-9;
  if (!inRange(state.yaw, range.yaw) || !inRange(state.pitch, range.pitch)) {
    note(`camera clamped to the pose range the MPI was built for (yaw ${range.yaw.map((v) => v.toFixed(3))}, ` +
         `pitch ${range.pitch.map((v) => v.toFixed(3))})`);
  }
  state.yaw = clamp(state.yaw, range.yaw[0], range.yaw[1]);
  state.pitch = clamp(state.pitch, range.pitch[0], range.pitch[1]);

  canvas.width = canvas.height = size;  // what is drawn: size x size pixels, as gmpi render renders them
  // How large it is shown: the largest whole multiple of size that fits the window above the controls, nearest
  // upscaling (image-rendering: pixelated), so a 32 px page fills a 900 x 700 window at 640 px and every drawn pixel
  // becomes an exact block of screen pixels. A window smaller than the page shows it at 1:1.
  function layout() {
    const room = Math.min(window.innerWidth, window.innerHeight - $('panel').offsetHeight);
    const shown = size * Math.max(1, Math.floor(room / size));
    canvas.style.width = canvas.style.height = shown + 'px';
    $('panel').style.top = shown + 'px';
  }
  layout();
  window.addEventListener('resize', layout);

  // ------------------------------------------------------------------------------------------------ WebGL
  const gl = canvas.getContext('webgl2', { alpha: false, antialias: false, depth: false, stencil: false,
                                            premultipliedAlpha: false, preserveDrawingBuffer: false });
  if (!gl) fail('this browser has no WebGL2 (needed for texture arrays and float textures)');
  gl.disable(gl.DITHER);

  const VERTEX = `#version 300 es
  void main() {  // one triangle over the whole viewport, no vertex buffer
    vec2 p = vec2(float((gl_VertexID << 1) & 2), float(gl_VertexID & 2));
    gl_Position = vec4(p * 2.0 - 1.0, 0.0, 1.0);
  }`;
  const FRAGMENT = `#version 300 es
  precision highp float;
  precision highp int;
  precision highp sampler2D;
  precision highp sampler2DArray;
  uniform sampler2DArray uAlpha;   // L layers, (T+2)^2 with a zero border, R16F, linear
  uniform sampler2DArray uColor;   // K layers, RGBA16F, linear
  uniform sampler2D uPlanes;       // L x 1 RGBA32F: depth, extent height, extent width, colour layer
  uniform sampler2D uColormap;     // N x 1 RGBA32F: the depth colour map's bins
  uniform int uPlaneCount;
  uniform int uColormapBins;
  uniform int uDepthMode;
  uniform float uTexels;           // T
  uniform vec2 uViewport;          // W, H in pixels
  uniform float uFocal;            // pixels
  uniform mat3 uRotation;          // camera-to-world rotation: columns right, down, forward
  uniform vec3 uEye;               // camera centre (world)
  uniform vec2 uNearFar;
  out vec4 outColor;
  void main() {
    // pixel centre (u + 0.5, v + 0.5) with v counted from the top, as cameras.pixel_rays
    vec2 pixel = vec2(gl_FragCoord.x, uViewport.y - gl_FragCoord.y);
    vec3 ray = uRotation * vec3((pixel - 0.5 * uViewport) / uFocal, 1.0);
    vec2 slope = ray.xy / ray.z;
    float zPerDistance = 1.0 / ray.z;  // z-depth per unit of world z travelled: (ray . forward) / ray_z
    float toTexel = 0.5 * (uTexels - 1.0);
    float toUnit = 1.0 / (uTexels + 2.0);
    vec3 color = vec3(0.0);
    float depth = 0.0;
    float coverage = 0.0;
    for (int i = uPlaneCount - 1; i >= 0; --i) {  // back to front
      vec4 plane = texelFetch(uPlanes, ivec2(i, 0), 0);
      float dist = plane.x - uEye.z;
      vec2 hit = uEye.xy + dist * slope;
      vec2 grid = hit * vec2(2.0 / plane.z, 2.0 / plane.y);         // [-1, 1] over the texel centres
      vec2 uv = ((grid + 1.0) * toTexel + 1.5) * toUnit;            // texel centre k at (k + 1.5) / (T + 2)
      float a = texture(uAlpha, vec3(uv, float(i))).r;
      vec3 c = texture(uColor, vec3(uv, plane.w)).rgb;
      color = a * c + (1.0 - a) * color;
      depth = a * dist * zPerDistance + (1.0 - a) * depth;
      coverage = a + (1.0 - a) * coverage;
    }
    if (uDepthMode == 1) {
      float x = clamp((depth - uNearFar.x) / (uNearFar.y - uNearFar.x), 0.0, 1.0);
      int bin = min(int(x * float(uColormapBins)), uColormapBins - 1);
      color = texelFetch(uColormap, ivec2(bin, 0), 0).rgb * clamp(coverage, 0.0, 1.0);
    }
    outColor = vec4(clamp(color, 0.0, 1.0), 1.0);
  }`;

  function compile(type, source) {
    const s = gl.createShader(type);
    gl.shaderSource(s, source);
    gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) fail('shader: ' + gl.getShaderInfoLog(s));
    return s;
  }
  const program = gl.createProgram();
  gl.attachShader(program, compile(gl.VERTEX_SHADER, VERTEX));
  gl.attachShader(program, compile(gl.FRAGMENT_SHADER, FRAGMENT));
  gl.linkProgram(program);
  if (!gl.getProgramParameter(program, gl.LINK_STATUS)) fail('shader link: ' + gl.getProgramInfoLog(program));
  gl.useProgram(program);
  const uniform = {};
  for (const name of ['uAlpha', 'uColor', 'uPlanes', 'uColormap', 'uPlaneCount', 'uColormapBins', 'uDepthMode',
                      'uTexels', 'uViewport', 'uFocal', 'uRotation', 'uEye', 'uNearFar']) {
    uniform[name] = gl.getUniformLocation(program, name);
  }
  gl.bindVertexArray(gl.createVertexArray());

  const T = M.texture_resolution, B = T + 2, L = M.plane_depths.length;
  const units = { uAlpha: 0, uColor: 1, uPlanes: 2, uColormap: 3 };
  for (const [name, unit] of Object.entries(units)) gl.uniform1i(uniform[name], unit);
  gl.uniform1i(uniform.uPlaneCount, L);
  gl.uniform1f(uniform.uTexels, T);
  gl.uniform2f(uniform.uNearFar, M.near, M.far);
  gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);

  function texture(unit, target, filter) {
    const t = gl.createTexture();
    gl.activeTexture(gl.TEXTURE0 + unit);
    gl.bindTexture(target, t);
    gl.texParameteri(target, gl.TEXTURE_MIN_FILTER, filter);
    gl.texParameteri(target, gl.TEXTURE_MAG_FILTER, filter);
    gl.texParameteri(target, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
    gl.texParameteri(target, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
    return t;
  }
  const colormap = M.colormap;  // N x [r, g, b] in [0, 1]
  texture(units.uColormap, gl.TEXTURE_2D, gl.NEAREST);
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA32F, colormap.length, 1, 0, gl.RGBA, gl.FLOAT,
                new Float32Array(colormap.flatMap((c) => [c[0], c[1], c[2], 1])));
  gl.uniform1i(uniform.uColormapBins, colormap.length);
  const alphaTexture = texture(units.uAlpha, gl.TEXTURE_2D_ARRAY, gl.LINEAR);
  gl.texStorage3D(gl.TEXTURE_2D_ARRAY, 1, gl.R16F, B, B, L);
  let colorTexture = null;
  texture(units.uPlanes, gl.TEXTURE_2D, gl.NEAREST);

  // ------------------------------------------------------------------------------------------------ data
  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement('script');
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error(`cannot load ${src}: keep the exported folder together`));
      document.head.appendChild(s);
    });
  }

  async function inflate(base64) {
    const text = atob(base64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
    return new Response(stream).arrayBuffer();
  }

  async function upload(seed) {
    if (!(seed in SEEDS)) await loadScript(M.files[seed]);
    const entry = SEEDS[seed];
    const buffer = await inflate(entry.data);
    const K = entry.rgb_layers, n = T * T;
    if (buffer.byteLength !== L * n * 2 + K * 3 * n) fail(`seed ${seed}: data has ${buffer.byteLength} bytes`);
    const alpha = new Uint16Array(buffer, 0, L * n);
    const rgb = new Uint8Array(buffer, L * n * 2, K * 3 * n);
    const layer = new Float32Array(B * B);   // interior written, border stays 0
    gl.activeTexture(gl.TEXTURE0 + units.uAlpha);
    gl.bindTexture(gl.TEXTURE_2D_ARRAY, alphaTexture);
    for (let i = 0; i < L; i++) {
      for (let y = 0; y < T; y++) {
        for (let x = 0; x < T; x++) layer[(y + 1) * B + x + 1] = alpha[i * n + y * T + x] / 65535;
      }
      gl.texSubImage3D(gl.TEXTURE_2D_ARRAY, 0, 0, 0, i, B, B, 1, gl.RED, gl.FLOAT, layer);
    }
    if (colorTexture) gl.deleteTexture(colorTexture);
    colorTexture = texture(units.uColor, gl.TEXTURE_2D_ARRAY, gl.LINEAR);
    gl.texStorage3D(gl.TEXTURE_2D_ARRAY, 1, gl.RGBA16F, B, B, K);
    const rgba = new Float32Array(B * B * 4);
    for (let k = 0; k < K; k++) {
      for (let y = 0; y < T; y++) {
        for (let x = 0; x < T; x++) {
          const o = ((y + 1) * B + x + 1) * 4, p = y * T + x;
          for (let c = 0; c < 3; c++) rgba[o + c] = rgb[(k * 3 + c) * n + p] / 255;
          rgba[o + 3] = 1;
        }
      }
      gl.texSubImage3D(gl.TEXTURE_2D_ARRAY, 0, 0, 0, k, B, B, 1, gl.RGBA, gl.FLOAT, rgba);
    }
    const planes = new Float32Array(L * 4);
    for (let i = 0; i < L; i++) {
      planes.set([M.plane_depths[i], M.plane_extents[i][0], M.plane_extents[i][1], entry.rgb_index[i]], i * 4);
    }
    gl.activeTexture(gl.TEXTURE0 + units.uPlanes);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA32F, L, 1, 0, gl.RGBA, gl.FLOAT, planes);
    state.loaded = seed;
  }

  // ------------------------------------------------------------------------------------------------ camera
  function camera(yaw, pitch) {  // cameras.sphere_c2w: on the sphere, looking at its centre, no roll
    const r = M.sphere_r, cp = Math.abs(Math.cos(pitch));
    const offset = [cp * Math.sin(yaw) * r, -Math.sin(pitch) * r, -cp * Math.cos(yaw) * r];
    const unit = (v) => { const l = Math.hypot(v[0], v[1], v[2]); return v.map((x) => x / l); };
    const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
    const forward = unit(offset.map((v) => -v));
    const right = unit(cross([0, 1, 0], forward));
    const down = unit(cross(forward, right));
    return { rotation: [...right, ...down, ...forward], eye: [offset[0], offset[1], M.sphere_center_z + offset[2]] };
  }

  function draw() {
    const cam = camera(state.yaw, state.pitch);
    const f = size / (2 * Math.tan((M.fov_deg * Math.PI) / 360));
    gl.viewport(0, 0, size, size);
    gl.uniformMatrix3fv(uniform.uRotation, false, new Float32Array(cam.rotation));
    gl.uniform3fv(uniform.uEye, new Float32Array(cam.eye));
    gl.uniform2f(uniform.uViewport, size, size);
    gl.uniform1f(uniform.uFocal, f);
    gl.uniform1i(uniform.uDepthMode, state.mode === 'depth' ? 1 : 0);
    gl.drawArrays(gl.TRIANGLES, 0, 3);
  }

  // ------------------------------------------------------------------------------------------------ loop
  let windowStart = performance.now(), windowFrames = 0;
  function frame(now) {
    if (state.loaded !== null) {
      draw();
      state.frameCount++;
      windowFrames++;
      if (state.drawnAt === null) state.drawnAt = state.frameCount;
      else if (state.frameCount === state.drawnAt + 1 && document.title !== 'ready') document.title = 'ready';
    }
    if (now - windowStart >= 500) {
      state.fps = (windowFrames * 1000) / (now - windowStart);
      windowStart = now;
      windowFrames = 0;
      $('fps').textContent = state.loaded === null ? 'loading' : `${state.fps.toFixed(1)} fps`;
    }
    $('pose').textContent = `yaw ${state.yaw.toFixed(3)}  pitch ${state.pitch.toFixed(3)}  ${L} planes`;
    requestAnimationFrame(frame);
  }

  // ------------------------------------------------------------------------------------------------ controls
  const seedSelect = $('seed');
  for (const s of M.seeds) seedSelect.add(new Option(String(s), String(s), false, s === state.seed));
  async function setSeed(seed) {
    state.seed = seed;
    $('fps').textContent = 'loading';
    try {
      await upload(seed);
    } catch (e) {
      fail(String(e.message || e));
    }
  }
  seedSelect.addEventListener('change', () => setSeed(Number(seedSelect.value)));
  const modeButton = $('mode');
  function setMode(mode) {
    state.mode = mode;
    modeButton.textContent = mode === 'depth' ? 'show colour' : 'show depth';
  }
  modeButton.addEventListener('click', () => setMode(state.mode === 'depth' ? 'rgb' : 'depth'));
  function setView(yaw, pitch) {
    state.yaw = clamp(yaw, range.yaw[0], range.yaw[1]);
    state.pitch = clamp(pitch, range.pitch[0], range.pitch[1]);
  }
  const reset = () => setView(M.yaw_mean, M.pitch_mean);
  $('reset').addEventListener('click', reset);
  canvas.addEventListener('dblclick', reset);
  window.addEventListener('keydown', (e) => {
    if (e.key === 'd' || e.key === 'D') setMode(state.mode === 'depth' ? 'rgb' : 'depth');
    const step = 0.02 * (e.shiftKey ? 5 : 1);
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
    if (moves[e.key]) { setView(state.yaw + moves[e.key][0], state.pitch + moves[e.key][1]); e.preventDefault(); }
  });

  // drag to orbit (mouse, pen and touch through pointer events): a drag across the canvas spans the pose range
  let drag = null;
  canvas.addEventListener('pointerdown', (e) => {
    drag = { x: e.clientX, y: e.clientY, yaw: state.yaw, pitch: state.pitch, id: e.pointerId };
    canvas.setPointerCapture(e.pointerId);
    canvas.classList.add('dragging');
  });
  canvas.addEventListener('pointermove', (e) => {
    if (!drag || e.pointerId !== drag.id) return;
    const rect = canvas.getBoundingClientRect();
    setView(drag.yaw - ((e.clientX - drag.x) / rect.width) * (range.yaw[1] - range.yaw[0]),
            drag.pitch + ((e.clientY - drag.y) / rect.height) * (range.pitch[1] - range.pitch[0]));
  });
  const endDrag = (e) => {
    if (drag && e.pointerId === drag.id) { drag = null; canvas.classList.remove('dragging'); }
  };
  canvas.addEventListener('pointerup', endDrag);
  canvas.addEventListener('pointercancel', endDrag);
  canvas.addEventListener('webglcontextlost', (e) => { e.preventDefault(); fail('WebGL context lost'); });

  window.gmpiViewer = {  // for scripts and headless tests
    get fps() { return state.fps; },
    get frames() { return state.frameCount; },
    get view() { return { seed: state.seed, yaw: state.yaw, pitch: state.pitch, mode: state.mode, size }; },
    get shown() { return canvas.getBoundingClientRect().width; },  // CSS pixels on screen (a multiple of size)
    setView, setMode, setSeed,
  };

  setMode(state.mode);
  setSeed(state.seed);
  requestAnimationFrame(frame);
})();
